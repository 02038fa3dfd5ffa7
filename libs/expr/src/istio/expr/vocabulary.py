"""The standard attribute vocabulary: what Istio 0.2 shipped as its `istioproxy` and
`kubernetes` attribute manifests, plus the few attributes its proxy sent beyond them
(source/destination port, connection.mtls, total sizes)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from istio.expr.types import ValueType

_S, _I, _B = ValueType.STRING, ValueType.INT64, ValueType.BOOL
_T, _D = ValueType.TIMESTAMP, ValueType.DURATION
_IP, _M = ValueType.IP_ADDRESS, ValueType.STRING_MAP

PROXY_ATTRIBUTES: Mapping[str, ValueType] = MappingProxyType(
    {
        "origin.ip": _IP,
        "origin.uid": _S,
        "origin.user": _S,
        "request.headers": _M,
        "request.id": _S,
        "request.host": _S,
        "request.method": _S,
        "request.path": _S,
        "request.reason": _S,
        "request.referer": _S,
        "request.scheme": _S,
        "request.size": _I,
        "request.total_size": _I,
        "request.time": _T,
        "request.useragent": _S,
        "response.code": _I,
        "response.duration": _D,
        "response.headers": _M,
        "response.size": _I,
        "response.total_size": _I,
        "response.time": _T,
        "source.uid": _S,
        "source.user": _S,
        "source.port": _I,
        "destination.uid": _S,
        "destination.port": _I,
        "connection.id": _S,
        "connection.mtls": _B,
        "connection.received.bytes": _I,
        "connection.received.bytes_total": _I,
        "connection.sent.bytes": _I,
        "connection.sent.bytes_total": _I,
        "connection.duration": _D,
        "context.protocol": _S,
        "context.timestamp": _T,
        "context.time": _T,
        "api.service": _S,
        "api.version": _S,
        "api.operation": _S,
        "api.protocol": _S,
        "request.auth.principal": _S,
        "request.auth.audiences": _S,
        "request.auth.presenter": _S,
        "request.api_key": _S,
        "check.error_code": _I,
        "check.error_message": _S,
    }
)

KUBERNETES_ATTRIBUTES: Mapping[str, ValueType] = MappingProxyType(
    {
        "source.ip": _IP,
        "source.labels": _M,
        "source.name": _S,
        "source.namespace": _S,
        "source.service": _S,
        "source.serviceAccount": _S,
        "destination.ip": _IP,
        "destination.labels": _M,
        "destination.name": _S,
        "destination.namespace": _S,
        "destination.service": _S,
        "destination.serviceAccount": _S,
    }
)

STANDARD_VOCABULARY: Mapping[str, ValueType] = MappingProxyType(
    {**PROXY_ATTRIBUTES, **KUBERNETES_ATTRIBUTES}
)
"""Every attribute of the standard vocabulary with its type."""
