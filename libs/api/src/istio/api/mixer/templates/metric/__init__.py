"""Generated from proto/ by tools/protogen: do not edit."""
