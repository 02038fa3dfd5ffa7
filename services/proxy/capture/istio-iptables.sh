#!/bin/bash
# Traffic capture for a sidecar, after Istio 0.2's istio-iptables.sh (our own text).
#
# Installs nat rules in the current network namespace that send the pod's TCP traffic to the
# sidecar's port: inbound connections from PREROUTING, outbound ones from OUTPUT, except the
# sidecar's own (its uid/gid), explicit loopback and excluded ranges. The kernel keeps the
# original destination, which the sidecar reads with SO_ORIGINAL_DST.
#
# Every run first removes the rules of any earlier run, so running it twice gives the same
# rules; -c only removes them. See docs/capture.md.

set -euo pipefail

readonly PROG="${0##*/}"
readonly CHAINS=(ISTIO_OUTPUT ISTIO_INBOUND ISTIO_IN_REDIRECT ISTIO_REDIRECT)

usage() {
  cat <<EOF
usage: ${PROG} [-p PORT] [-u UID] [-g GID] [-i CIDRS] [-x CIDRS] [-b PORTS] [-d PORTS] [-n] [-c] [-h]

  -p PORT   the sidecar's port that captured TCP is redirected to (default 15001)
  -u UID    uid(s) whose outbound traffic is never captured: the sidecar's (default 1337);
            comma separated, or '' for none
  -g GID    gid(s) whose outbound traffic is never captured (default none); comma separated
  -i CIDRS  outbound IPv4 ranges to capture, comma separated; '*' for all (default '*');
            '' captures none (only the implicit-loopback rule stays)
  -x CIDRS  outbound IPv4 ranges never captured, comma separated (default none)
  -b PORTS  inbound TCP ports to capture, comma separated; '*' for all (default '*');
            '' captures no inbound traffic
  -d PORTS  inbound TCP ports never captured, comma separated (default none)
  -n        dry run: print the iptables commands instead of running them
  -c        clean: remove the rules and chains this script installs, then exit
  -h        this help

Environment: IPTABLES names the iptables command (default: iptables, falling back to
iptables-legacy when iptables cannot use the nat table).
EOF
}

die() {
  echo "${PROG}: error: $*" >&2
  exit 2
}

note() {
  echo "${PROG}: $*" >&2
}

# ---- arguments -------------------------------------------------------------------------------

PROXY_PORT=15001
PROXY_UIDS=1337
PROXY_GIDS=""
INCLUDE_CIDRS="*"
EXCLUDE_CIDRS=""
INBOUND_PORTS="*"
INBOUND_EXCLUDE=""
DRY_RUN=0
CLEAN_ONLY=0

while getopts ":p:u:g:i:x:b:d:nch" opt; do
  case "${opt}" in
    p) PROXY_PORT="${OPTARG}" ;;
    u) PROXY_UIDS="${OPTARG}" ;;
    g) PROXY_GIDS="${OPTARG}" ;;
    i) INCLUDE_CIDRS="${OPTARG}" ;;
    x) EXCLUDE_CIDRS="${OPTARG}" ;;
    b) INBOUND_PORTS="${OPTARG}" ;;
    d) INBOUND_EXCLUDE="${OPTARG}" ;;
    n) DRY_RUN=1 ;;
    c) CLEAN_ONLY=1 ;;
    h)
      usage
      exit 0
      ;;
    :) die "option -${OPTARG} needs a value (see -h)" ;;
    *) die "unknown option -${OPTARG} (see -h)" ;;
  esac
done
shift $((OPTIND - 1))
if (($# > 0)); then
  die "unexpected argument '$1' (lists are comma separated: -i 10.0.0.0/8,172.16.0.0/12)"
fi

# split_list LIST: prints the comma-separated items of LIST one per line, spaces dropped.
split_list() {
  local item
  local -a items
  IFS=',' read -r -a items <<<"${1// /}"
  for item in "${items[@]}"; do
    if [[ -n "${item}" ]]; then
      printf '%s\n' "${item}"
    fi
  done
}

is_port() {
  [[ "$1" =~ ^[0-9]{1,5}$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535))
}

is_id() {
  [[ "$1" =~ ^[0-9]{1,10}$ ]] && ((10#$1 <= 4294967294))
}

is_ipv4_cidr() {
  local addr="${1%%/*}" octet
  local -a octets
  if [[ "$1" == */* ]]; then
    local len="${1#*/}"
    [[ "${len}" =~ ^[0-9]{1,2}$ ]] && ((10#${len} <= 32)) || return 1
  fi
  [[ "${addr}" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || return 1
  IFS='.' read -r -a octets <<<"${addr}"
  for octet in "${octets[@]}"; do
    ((10#${octet} <= 255)) || return 1
  done
}

# Lists after validation, one item per array element.
UIDS=()
GIDS=()
INCLUDES=()
EXCLUDES=()
IN_PORTS=()
IN_EXCLUDES=()

is_port "${PROXY_PORT}" || die "-p: '${PROXY_PORT}' is not a TCP port (1-65535)"

while read -r item; do
  is_id "${item}" || die "-u: '${item}' is not a numeric uid"
  UIDS+=("${item}")
done < <(split_list "${PROXY_UIDS}")

while read -r item; do
  is_id "${item}" || die "-g: '${item}' is not a numeric gid"
  GIDS+=("${item}")
done < <(split_list "${PROXY_GIDS}")

check_cidrs() { # FLAG LIST ALLOW_STAR -> prints the items
  local flag="$1" list="$2" allow_star="$3" item
  while read -r item; do
    if [[ "${item}" == "*" ]]; then
      ((allow_star)) || die "${flag}: '*' is not allowed here; list the ranges"
      [[ "${list// /}" == "*" ]] || die "${flag}: '*' cannot be combined with other ranges"
    elif [[ "${item}" == *:* ]]; then
      die "${flag}: '${item}' is IPv6; only IPv4 ranges are captured (as in Istio 0.2)"
    elif ! is_ipv4_cidr "${item}"; then
      die "${flag}: '${item}' is not an IPv4 address or CIDR (like 10.0.0.0/8)"
    fi
    printf '%s\n' "${item}"
  done < <(split_list "${list}")
}

check_ports() { # FLAG LIST ALLOW_STAR -> prints the items
  local flag="$1" list="$2" allow_star="$3" item
  while read -r item; do
    if [[ "${item}" == "*" ]]; then
      ((allow_star)) || die "${flag}: '*' is not allowed here; list the ports"
      [[ "${list// /}" == "*" ]] || die "${flag}: '*' cannot be combined with other ports"
    elif ! is_port "${item}"; then
      die "${flag}: '${item}' is not a TCP port (1-65535)"
    fi
    printf '%s\n' "${item}"
  done < <(split_list "${list}")
}

# Process substitution hides a failing die's exit status, so validate in a subshell first.
(check_cidrs -i "${INCLUDE_CIDRS}" 1 >/dev/null) || exit 2
(check_cidrs -x "${EXCLUDE_CIDRS}" 0 >/dev/null) || exit 2
(check_ports -b "${INBOUND_PORTS}" 1 >/dev/null) || exit 2
(check_ports -d "${INBOUND_EXCLUDE}" 0 >/dev/null) || exit 2
mapfile -t INCLUDES < <(check_cidrs -i "${INCLUDE_CIDRS}" 1)
mapfile -t EXCLUDES < <(check_cidrs -x "${EXCLUDE_CIDRS}" 0)
mapfile -t IN_PORTS < <(check_ports -b "${INBOUND_PORTS}" 1)
mapfile -t IN_EXCLUDES < <(check_ports -d "${INBOUND_EXCLUDE}" 0)

# ---- iptables --------------------------------------------------------------------------------

# Debian's iptables is the nf_tables backend. Use it; fall back to iptables-legacy only when
# it cannot use the nat table here (an old kernel without nf_tables), and say so.
choose_iptables() {
  if [[ -n "${IPTABLES:-}" ]]; then
    command -v "${IPTABLES}" >/dev/null 2>&1 || die "IPTABLES=${IPTABLES}: command not found"
    return
  fi
  if ! command -v iptables >/dev/null 2>&1; then
    if ((DRY_RUN)); then
      IPTABLES=iptables
      return
    fi
    die "iptables not found: install Debian's iptables package (make setup does)"
  fi
  IPTABLES=iptables
  local err
  if ((DRY_RUN)) || err="$(iptables -w -t nat -S 2>&1 >/dev/null)"; then
    return
  fi
  if command -v iptables-legacy >/dev/null 2>&1 && iptables-legacy -w -t nat -S >/dev/null 2>&1; then
    note "iptables cannot use the nat table (${err}); falling back to iptables-legacy"
    IPTABLES=iptables-legacy
    return
  fi
  die "iptables cannot use the nat table: ${err} (needs root or CAP_NET_ADMIN)"
}

# ipt ARGS...: runs (or, dry, prints) one iptables command on the nat table.
ipt() {
  if ((DRY_RUN)); then
    local line="${IPTABLES} -t nat" word
    for word in "$@"; do
      [[ "${word}" == "!" ]] || printf -v word '%q' "${word}"
      line+=" ${word}"
    done
    printf '%s\n' "${line}"
    return
  fi
  "${IPTABLES}" -w -t nat "$@"
}

chain_exists() {
  "${IPTABLES}" -w -t nat -n -L "$1" >/dev/null 2>&1
}

is_ours() {
  local chain
  for chain in "${CHAINS[@]}"; do
    [[ "$1" == "${chain}" ]] && return 0
  done
  return 1
}

# Removes every rule of PREROUTING and OUTPUT that jumps to one of our chains, then our
# chains. Reads the current rules (read-only, also in a dry run when it is allowed to).
clean() {
  local builtin num target rule_nums
  for builtin in PREROUTING OUTPUT; do
    local listing
    if ! listing="$("${IPTABLES}" -w -t nat -n -L "${builtin}" --line-numbers 2>/dev/null)"; then
      ((DRY_RUN)) && note "dry run: cannot read the current ${builtin} rules; not listing their removal"
      continue
    fi
    rule_nums=()
    while read -r num target _; do
      [[ "${num}" =~ ^[0-9]+$ ]] && is_ours "${target}" && rule_nums=("${num}" "${rule_nums[@]}")
    done <<<"${listing}"
    # Highest number first, so the numbers still left stay valid.
    for num in "${rule_nums[@]}"; do
      ipt -D "${builtin}" "${num}"
    done
  done
  local chain present=()
  for chain in "${CHAINS[@]}"; do
    chain_exists "${chain}" && present+=("${chain}")
  done
  # Flush all first: ISTIO_OUTPUT refers to ISTIO_REDIRECT, and a referenced chain can't go.
  for chain in "${present[@]}"; do
    ipt -F "${chain}"
  done
  for chain in "${present[@]}"; do
    ipt -X "${chain}"
  done
}

install_rules() {
  local port cidr id

  # Common redirect to the sidecar port, for outbound capture.
  ipt -N ISTIO_REDIRECT
  ipt -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports "${PROXY_PORT}"

  # Inbound: PREROUTING -> ISTIO_INBOUND -> ISTIO_IN_REDIRECT for the captured ports.
  if ((${#IN_PORTS[@]} > 0)); then
    ipt -N ISTIO_IN_REDIRECT
    ipt -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports "${PROXY_PORT}"
    ipt -N ISTIO_INBOUND
    ipt -A PREROUTING -p tcp -j ISTIO_INBOUND
    for port in "${IN_EXCLUDES[@]}"; do
      ipt -A ISTIO_INBOUND -p tcp --dport "${port}" -j RETURN
    done
    if [[ "${IN_PORTS[0]}" == "*" ]]; then
      ipt -A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
    else
      for port in "${IN_PORTS[@]}"; do
        ipt -A ISTIO_INBOUND -p tcp --dport "${port}" -j ISTIO_IN_REDIRECT
      done
    fi
  fi

  # Outbound: OUTPUT -> ISTIO_OUTPUT.
  ipt -N ISTIO_OUTPUT
  ipt -A OUTPUT -p tcp -j ISTIO_OUTPUT
  # The app calling its own pod IP (or a VIP routed to lo) still goes through the sidecar.
  ipt -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -j ISTIO_REDIRECT
  # The sidecar's own connections leave as they are, or they would loop back into it.
  for id in "${UIDS[@]}"; do
    ipt -A ISTIO_OUTPUT -m owner --uid-owner "${id}" -j RETURN
  done
  for id in "${GIDS[@]}"; do
    ipt -A ISTIO_OUTPUT -m owner --gid-owner "${id}" -j RETURN
  done
  # Explicit localhost: sidecar-aware apps and container-to-container traffic.
  ipt -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
  for cidr in "${EXCLUDES[@]}"; do
    ipt -A ISTIO_OUTPUT -d "${cidr}" -j RETURN
  done
  if ((${#INCLUDES[@]} > 0)); then
    if [[ "${INCLUDES[0]}" == "*" ]]; then
      ipt -A ISTIO_OUTPUT -j ISTIO_REDIRECT
    else
      for cidr in "${INCLUDES[@]}"; do
        ipt -A ISTIO_OUTPUT -d "${cidr}" -j ISTIO_REDIRECT
      done
    fi
  fi
}

# ---- main ------------------------------------------------------------------------------------

report_failure() {
  local rc=$?
  if ((rc != 0)); then
    note "failed (exit ${rc}); rules may be half done: run it again, or with -c to remove them"
  fi
}

choose_iptables
if ((!DRY_RUN)); then
  trap report_failure EXIT
fi
clean
if ((CLEAN_ONLY)); then
  ((DRY_RUN)) || note "removed the capture rules (${IPTABLES})"
  exit 0
fi
install_rules
((DRY_RUN)) || note "capture rules installed (${IPTABLES}): TCP to port ${PROXY_PORT}"
