#!/usr/bin/env bash
# Register SuperNode public keys with a running SuperLink (started with --enable-supernode-auth).
#
#   deploy/register.sh FEDERATION KEY.pub [KEY.pub ...]
#
# FEDERATION is a [superlink.<name>] entry of $FLWR_HOME/config.toml (address and
# root-certificates of the SuperLink). Only registered SuperNodes may connect.
set -euo pipefail
federation="$1"
shift
for pub in "$@"; do
  flwr supernode register "$pub" "$federation"
done
