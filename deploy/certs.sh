#!/usr/bin/env bash
# TLS material for the SuperLink: a private CA and a server certificate signed by it.
#
#   deploy/certs.sh [OUT_DIR] [SAN ...]
#
# OUT_DIR defaults to deploy/certificates. The certificate is valid for localhost,
# 127.0.0.1 and the compose service name "superlink"; add the names or addresses that
# SuperNodes on other machines use to reach the SuperLink as extra SANs, e.g.
#   deploy/certs.sh deploy/certificates DNS:fl.example.org IP:10.0.0.5
# SuperNodes (and `flwr run`) verify the SuperLink against ca.crt; keep ca.key offline.
set -euo pipefail
out="${1:-$(dirname "$0")/certificates}"
shift || true
sans="DNS:localhost,IP:127.0.0.1,DNS:superlink"
for san in "$@"; do sans="$sans,$san"; done
mkdir -p "$out"
cd "$out"
umask 077
# EC P-256 keys: as strong as RSA-3072 for TLS, and generated instantly.
openssl ecparam -name prime256v1 -genkey -noout -out ca.key
openssl req -x509 -new -key ca.key -sha256 -days 825 -subj "/CN=copra-fl federation CA" -out ca.crt
openssl ecparam -name prime256v1 -genkey -noout -out server.key
openssl req -new -key server.key -subj "/CN=superlink" -out server.csr
cat > server.ext <<EXT
subjectAltName=$sans
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
EXT
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 -sha256 \
  -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 644 ca.crt server.pem
# The official images run as uid 49999: the SuperLink container must be able to read its key.
chmod 644 server.key
echo "certificates in $out (SANs: $sans)"
