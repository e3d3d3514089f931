#!/usr/bin/env bash
# SuperNode authentication keys: one EC (NIST P-384) key pair per SuperNode, OpenSSH format,
# as Flower's node authentication expects.
#
#   deploy/keys.sh [N] [OUT_DIR]
#
# Writes OUT_DIR/supernode-<i> (private: stays on that SuperNode's machine) and
# OUT_DIR/supernode-<i>.pub (public: registered with the SuperLink by deploy/register.sh).
set -euo pipefail
n="${1:-2}"
out="${2:-$(dirname "$0")/keys}"
mkdir -p "$out"
for i in $(seq 1 "$n"); do
  key="$out/supernode-$i"
  if [ -e "$key" ]; then
    echo "keeping existing $key"
    continue
  fi
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "copra-fl supernode-$i" -f "$key"
  chmod 644 "$key"  # read by the container user (uid 49999); keep the folder itself private
done
echo "keys in $out"
