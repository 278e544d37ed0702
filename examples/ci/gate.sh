#!/usr/bin/env bash
# Gate a model before deployment; when it is below the gate, repair it, export it to ONNX and gate
# the repaired model again. A generic CI step (GitLab CI, Jenkins, Buildkite, CircleCI, a Makefile,
# a cron job): one command whose exit code is the step's result.
#
#   examples/ci/gate.sh MODEL REPAIR_DATA HELDOUT_DATA GROUP_BY [OUT]
#
#   MODEL         the checkpoint to deploy: a timm or transformers folder, or an .onnx file (a bare
#                 .safetensors file needs --arch or --factory, which this script does not pass)
#   REPAIR_DATA   a labelled repair set: the repair fits and selects on it, and on nothing else
#   HELDOUT_DATA  a labelled held-out set with the group column: both gates measure on it; the repair
#                 never fits or selects on it. Do not loop over recipes until this gate passes: that
#                 would select on the held-out set, and its figure would no longer be honest.
#   GROUP_BY      the group column (groups are class x the values of this column)
#   OUT           where the repaired model goes (default <MODEL>-repaired, in MODEL's format), with its
#                 ONNX export: OUT/model.onnx for a folder, OUT's name with .onnx for a file
#
# Environment: WGA_GATE (minimum worst-group accuracy, a fraction or a percentage; default 70%),
# RECIPE (the repair recipe; default auto: head repairs without group labels, compared by
# cross-validation on REPAIR_DATA), EXPECT_GROUPS (the groups HELDOUT_DATA must hold, class|value
# separated by commas, e.g. "landbird|land,landbird|water,waterbird|land,waterbird|water": both gates
# fail when one has no samples. Set it: without it a held-out set that lost a whole value of
# GROUP_BY -- no waterbird on land at all -- is gated on the groups it still has, and can pass).
# `repair` must be on PATH.
#
# Exit codes (those of `repair`):
#   0  the model passes the gate (deploy MODEL), or its repair does (deploy OUT and its ONNX file)
#   1  below the gate even after the repair, or the ONNX export did not match the repaired model
#   2  bad input or usage: a model or data path not found, an unknown column, a bad threshold, OUT
#      already there, or this script's own arguments
#   3  internal error of repair (rerun with `repair --debug ...` and report it)
#   130, 143  interrupted (Ctrl-C) or terminated (SIGTERM, a CI timeout): nothing partial is left
#   other: the command could not run at all (127: `repair` not on PATH)
# Only exit 1 of the first gate leads to a repair. Every other non-zero code is passed on as it is,
# so a broken pipeline (a typo in a path, a missing column) is never taken for a model that merely
# needs repair, and never "repaired" into a pass.
set -u -o pipefail

if [ $# -lt 4 ] || [ $# -gt 5 ]; then
  echo "usage: $0 MODEL REPAIR_DATA HELDOUT_DATA GROUP_BY [OUT]" >&2
  exit 2
fi
MODEL=$1
REPAIR_DATA=$2
HELDOUT_DATA=$3
GROUP_BY=$4
if [ $# -eq 5 ]; then
  OUT=$5
elif [ -d "$MODEL" ]; then
  base=$MODEL
  while [ "${#base}" -gt 1 ] && [ "${base%/}" != "$base" ]; do base=${base%/}; done   # models/birds// too
  case $base in
    .|..|*/.|*/..)                               # the folder's own name: never OUT inside MODEL
      base=$(CDPATH='' cd -- "$base" && pwd) || { echo "error: cannot enter $MODEL" >&2; exit 2; } ;;
  esac
  OUT="${base}-repaired"
else
  OUT="${MODEL%.*}-repaired.${MODEL##*.}"
fi
WGA_GATE=${WGA_GATE:-70%}
RECIPE=${RECIPE:-auto}
expect=()
if [ -n "${EXPECT_GROUPS:-}" ]; then
  expect=(--expect-groups "$EXPECT_GROUPS")
fi

gate() {  # gate CHECKPOINT [OPTION...]: repair eval's exit code (0 pass, 1 below the gate, 2/3 errors)
  repair eval "$1" --data "$HELDOUT_DATA" --group-by "$GROUP_BY" --fail-under-wga "$WGA_GATE" \
    ${expect[@]+"${expect[@]}"} "${@:2}"
}

why() {  # why CODE: what a non-zero exit code other than a gate's 1 means
  case $1 in
    2) echo "bad input or usage" ;;
    3) echo "internal error of repair" ;;
    127) echo "repair not found on PATH" ;;
    130|143) echo "interrupted or terminated" ;;
    *) echo "the command could not run" ;;
  esac
}

echo "== gate: worst-group accuracy of $MODEL on $HELDOUT_DATA must be >= $WGA_GATE" >&2
gate "$MODEL"
rc=$?
case $rc in
  0) echo "gate passed: deploy $MODEL" >&2; exit 0 ;;
  1) ;;   # below the gate: repair it
  *) echo "error: repair eval exited $rc ($(why "$rc"), not a gate result)" >&2; exit "$rc" ;;
esac

echo "== below the gate: repairing $MODEL from $REPAIR_DATA (recipe $RECIPE) into $OUT, with ONNX" >&2
# --export onnx: the ONNX file is checked against the repaired model with onnxruntime on the repair
# set; a mismatch is exit 1 and leaves no file behind. --eval: before/after figures on the held-out set.
repair fix "$MODEL" --data "$REPAIR_DATA" --out "$OUT" --recipe "$RECIPE" --export onnx \
  --eval "$HELDOUT_DATA" --eval-group-by "$GROUP_BY"
rc=$?
if [ $rc -ne 0 ]; then
  echo "error: repair fix exited $rc ($(why "$rc"))" >&2
  exit "$rc"
fi

echo "== re-gate: the repaired model $OUT on $HELDOUT_DATA" >&2
# --exclude: a held-out sample that is also in the repair set (a copy) is left out of the figures, as
# repair fix --eval leaves it out; a group left without samples fails the gate
gate "$OUT" --exclude "$REPAIR_DATA"
rc=$?
case $rc in
  0) if [ -d "$OUT" ]; then onnx="$OUT/model.onnx"; else onnx="${OUT%.*}.onnx"; fi
     echo "the repaired model passes the gate: deploy $OUT (its verified ONNX file: $onnx)" >&2 ;;
  1) echo "FAILED: $MODEL is below the gate even after the repair" >&2 ;;
  *) echo "error: repair eval exited $rc ($(why "$rc"), not a gate result)" >&2 ;;
esac
exit "$rc"
