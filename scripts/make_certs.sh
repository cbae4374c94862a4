#!/usr/bin/env bash
# Generate everything a TLS + SuperNode-authenticated Flower 1.41 deployment needs.
#
#   scripts/make_certs.sh OUT_DIR [NUM_NODES]      (NUM_NODES defaults to 2)
#
# Writes into OUT_DIR:
#   ca.key, ca.crt                  a private CA (RSA 4096, 10 years)
#   server.key, server.crt          the SuperLink's certificate, signed by the CA, with
#                                   subjectAltName IP:127.0.0.1, IP:::1, DNS:localhost and,
#                                   if the env var SERVER_HOST is set, that host too
#                                   (an IP address or a DNS name)
#   node<i>, node<i>.pub            i = 1..NUM_NODES: one ECDSA P-384 key pair per SuperNode
#                                   in OpenSSH format (`ssh-keygen -t ecdsa -b 384`), which is
#                                   what flwr 1.41 wants on both sides:
#                                     flower-supernode --auth-supernode-private-key node<i>
#                                     flwr supernode register node<i>.pub <connection>
#
# SuperLink:  flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.crt
#                              --ssl-keyfile server.key --enable-supernode-auth
# SuperNode:  flower-supernode --root-certificates ca.crt --auth-supernode-private-key node<i>
# flwr CLI:   root-certificates = ".../ca.crt" in the connection of $FLWR_HOME/config.toml
# In 1.41 there is no registration CSV (--auth-list-public-keys was removed): each public
# key is registered with the running SuperLink through `flwr supernode register`.
#
# Idempotent: existing files are kept; the server certificate is re-issued only when it
# no longer verifies against ca.crt or lacks one of the wanted subjectAltNames.
set -euo pipefail

usage() { echo "usage: $0 OUT_DIR [NUM_NODES]   (env: SERVER_HOST=extra.host.or.ip)" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
OUT_DIR=$1
NUM_NODES=${2:-2}
[[ $NUM_NODES =~ ^[0-9]+$ ]] || { echo "NUM_NODES must be a non-negative integer, got '$NUM_NODES'" >&2; exit 2; }
for tool in openssl ssh-keygen; do
    command -v "$tool" >/dev/null || { echo "error: '$tool' not found on PATH" >&2; exit 1; }
done

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
umask 077   # private keys readable by the owner only
log() { echo "[make_certs] $*"; }

# --- subjectAltNames -------------------------------------------------------------------
SANS=("IP:127.0.0.1" "IP:0:0:0:0:0:0:0:1" "DNS:localhost")
if [[ -n ${SERVER_HOST:-} ]]; then
    if [[ $SERVER_HOST =~ ^[0-9]+(\.[0-9]+){3}$ || $SERVER_HOST == *:* ]]; then
        SANS+=("IP:$SERVER_HOST")
    else
        SANS+=("DNS:$SERVER_HOST")
    fi
fi
SAN_LINE=$(IFS=,; echo "${SANS[*]}")

# --- CA ------------------------------------------------------------------------------
CA_NEW=0
if [[ -s $OUT_DIR/ca.key && -s $OUT_DIR/ca.crt ]]; then
    log "CA exists: $OUT_DIR/ca.crt (kept)"
else
    log "creating CA: $OUT_DIR/ca.crt"
    openssl genrsa -out "$OUT_DIR/ca.key" 4096 2>/dev/null
    openssl req -x509 -new -sha256 -days 3650 -key "$OUT_DIR/ca.key" \
        -subj "/CN=dplora-flower local CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" \
        -out "$OUT_DIR/ca.crt"
    CA_NEW=1
fi

# --- SuperLink server certificate -----------------------------------------------------
server_cert_ok() {
    [[ -s $OUT_DIR/server.key && -s $OUT_DIR/server.crt ]] || return 1
    openssl verify -CAfile "$OUT_DIR/ca.crt" "$OUT_DIR/server.crt" >/dev/null 2>&1 || return 1
    local text
    text=$(openssl x509 -in "$OUT_DIR/server.crt" -noout -ext subjectAltName 2>/dev/null) || return 1
    local san want
    for san in "${SANS[@]}"; do
        want=${san/IP:0:0:0:0:0:0:0:1/IP Address:0:0:0:0:0:0:0:1}
        want=${want/#IP:/IP Address:}
        grep -qF -- "$want" <<<"$text" || return 1
    done
}
if [[ $CA_NEW == 0 ]] && server_cert_ok; then
    log "server certificate exists and covers $SAN_LINE: $OUT_DIR/server.crt (kept)"
else
    log "creating SuperLink certificate for $SAN_LINE: $OUT_DIR/server.crt"
    openssl genrsa -out "$OUT_DIR/server.key" 4096 2>/dev/null
    EXT=$(mktemp)
    trap 'rm -f "$EXT" "$OUT_DIR/server.csr"' EXIT
    cat >"$EXT" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
subjectAltName=$SAN_LINE
EOF
    openssl req -new -sha256 -key "$OUT_DIR/server.key" -subj "/CN=localhost" \
        -out "$OUT_DIR/server.csr"
    openssl x509 -req -sha256 -days 825 -in "$OUT_DIR/server.csr" \
        -CA "$OUT_DIR/ca.crt" -CAkey "$OUT_DIR/ca.key" -CAcreateserial \
        -extfile "$EXT" -out "$OUT_DIR/server.crt" 2>/dev/null
    rm -f "$OUT_DIR/server.csr" "$EXT"
    trap - EXIT
    openssl verify -CAfile "$OUT_DIR/ca.crt" "$OUT_DIR/server.crt" >/dev/null
fi
chmod 644 "$OUT_DIR/ca.crt" "$OUT_DIR/server.crt"

# --- SuperNode key pairs (ECDSA P-384, OpenSSH format) ---------------------------------
for ((i = 1; i <= NUM_NODES; i++)); do
    key=$OUT_DIR/node$i
    if [[ -s $key && -s $key.pub ]]; then
        log "SuperNode key pair exists: $key{,.pub} (kept)"
        continue
    fi
    rm -f "$key" "$key.pub"
    log "creating SuperNode key pair: $key{,.pub}"
    ssh-keygen -q -t ecdsa -b 384 -N '' -C "dplora-supernode-$i" -f "$key"
    chmod 644 "$key.pub"
done

log "done: $OUT_DIR (CA, SuperLink certificate, $NUM_NODES SuperNode key pair(s))"
