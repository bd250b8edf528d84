#!/usr/bin/env bash
# Run the three secure-inference parties on this machine, each on its own loopback address
# (client 127.0.0.1, server 127.0.0.2, helper 127.0.0.3) with TLS and fresh certificates:
# the same commands as on three hosts, tested locally.
#
# usage: research/secure_inference/run_local.sh MODEL CHECKPOINT IMAGES [SPEC] [-- CLIENT ARGS]
#   MODEL       MMLab config (.py) or torchvision name
#   CHECKPOINT  the server's weights
#   IMAGES      .npy [N, C, H, W] or a folder of images (client)
#   SPEC        Block-ReLU spec (.pickle/.json), optional ("" for all ReLUs)
#   CLIENT ARGS e.g. --labels y.npy --report run.json --plot run.png --input-shape 3 32 32
#               (session settings among them reach all three parties through session.yaml:
#               --input-shape, --frac-bits, --drelu-width, --drelu-margin, --drelu-bits,
#               --drop-bits, --prg)
# Environment: WORK (default: a new temp folder) holds certs/, session.yaml and logs;
#              PYTHON (default .venv/bin/python); SERVER_PORT/HELPER_PORT (7101/7102);
#              THREADS torch threads per party (default 1: three parties share the cores);
#              SERVER_ARGS extra flags for the server and helper (e.g. "--frac-bits 14");
#              PRG the randomness cipher of all three, aes (default) or chacha20;
#              DEVICE the torch device of every party (default cpu), or per party
#              CLIENT_DEVICE / SERVER_DEVICE / HELPER_DEVICE (e.g. cuda:0, cuda:1, cpu);
#              GRACE seconds the others get to end after a server or helper failed (10).
set -euo pipefail
if [[ $# -lt 3 ]]; then sed -n '2,22p' "$0"; exit 2; fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
MODEL="$1"; CHECKPOINT="$2"; IMAGES="$3"; SPEC="${4:-}"
shift 3; [[ $# -gt 0 ]] && shift
[[ "${1:-}" == "--" ]] && shift
WORK="${WORK:-$(mktemp -d -t si-local-XXXXXX)}"
mkdir -p "$WORK"
SERVER_PORT="${SERVER_PORT:-7101}"; HELPER_PORT="${HELPER_PORT:-7102}"
DEVICE="${DEVICE:-cpu}"
CLIENT_DEVICE="${CLIENT_DEVICE:-$DEVICE}"; SERVER_DEVICE="${SERVER_DEVICE:-$DEVICE}"
HELPER_DEVICE="${HELPER_DEVICE:-$DEVICE}"

"$PYTHON" "$HERE/make_certificates.py" "$WORK/certs" --force \
  --client-host 127.0.0.1 --server-host 127.0.0.2 --helper-host 127.0.0.3 > /dev/null
# session settings given among the client's arguments go into the session file, so the
# server and the helper compile the same program (a shape for the client only killed them)
session=()
client_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --input-shape)
      [[ $# -ge 4 ]] || { echo "run_local.sh: --input-shape needs C H W" >&2; exit 2; }
      session+=("input_shape: [$2, $3, $4]"); shift 4 ;;
    --frac-bits|--drelu-width|--drelu-margin|--drelu-bits|--drop-bits|--prg)
      [[ $# -ge 2 ]] || { echo "run_local.sh: $1 needs a value" >&2; exit 2; }
      key="${1#--}"; session+=("${key//-/_}: $2"); shift 2 ;;
    *) client_args+=("$1"); shift ;;
  esac
done
{
  echo "model: $MODEL"
  [[ -n "$SPEC" ]] && echo "spec: $(realpath "$SPEC")"
  echo "client: 127.0.0.1"
  echo "server: 127.0.0.2:$SERVER_PORT"
  echo "helper: 127.0.0.3:$HELPER_PORT"
  echo "certs: $WORK/certs"
  echo "threads: ${THREADS:-1}"
  printf '%s\n' "${session[@]}" | grep -q '^prg:' || echo "prg: ${PRG:-aes}"
  for line in "${session[@]}"; do echo "$line"; done
} > "$WORK/session.yaml"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
# shellcheck disable=SC2086
"$PYTHON" "$HERE/crypto_provider.py" --config-file "$WORK/session.yaml" \
  --device "$HELPER_DEVICE" ${SERVER_ARGS:-} \
  > "$WORK/helper.log" 2>&1 & pids+=($!)
# shellcheck disable=SC2086
"$PYTHON" "$HERE/server.py" --config-file "$WORK/session.yaml" --checkpoint "$CHECKPOINT" \
  --device "$SERVER_DEVICE" ${SERVER_ARGS:-} > "$WORK/server.log" 2>&1 & pids+=($!)
"$PYTHON" "$HERE/client.py" --config-file "$WORK/session.yaml" --device "$CLIENT_DEVICE" \
  --images "$IMAGES" ${client_args[@]+"${client_args[@]}"} & client=$!
pids+=("$client")
# whichever party ends first: a failing server or helper ends the run at once (the client
# would otherwise wait for it until its timeout)
status=0
declare -A name=([${pids[0]}]=helper [${pids[1]}]=server [$client]=client)
# After a server/helper failure the others get GRACE seconds (default 10) to end on their own
# (the client notices a closed link at once and still saves what it has), then are stopped.
remaining=("${pids[@]}")
failed_at=""
while [[ ${#remaining[@]} -gt 0 ]]; do
  left=()
  for p in "${remaining[@]}"; do
    if kill -0 "$p" 2>/dev/null; then left+=("$p"); continue; fi
    code=0
    wait "$p" || code=$?          # an exited child: bash keeps its status for this wait
    if [[ $code -ne 0 && $status -eq 0 ]]; then
      status=$code
      if [[ "${name[$p]}" != client ]]; then
        echo "run_local.sh: the ${name[$p]} exited with status $code; stopping the others" >&2
        failed_at=$SECONDS
      fi
    fi
  done
  remaining=(${left[@]+"${left[@]}"})
  if [[ -n "$failed_at" && $((SECONDS - failed_at)) -ge ${GRACE:-10} ]]; then
    for q in "${remaining[@]}"; do kill "$q" 2>/dev/null || true; done
  fi
  [[ ${#remaining[@]} -gt 0 ]] && sleep 0.2
done
pids=()
if [[ $status -ne 0 ]]; then
  echo "a party failed (exit $status); logs in $WORK:" >&2
  tail -n 20 "$WORK/server.log" "$WORK/helper.log" >&2
fi
exit $status
