# Shared by bench/train-step/*.sh: `run LABEL COMMAND...` runs a benchmark that prints one JSON
# line last and appends {"when", "config": LABEL, "result": that line} to $OUT (echoed too).
# Needs $OUT and $stamp set by the caller.
run() {
  local line
  line=$("${@:2}" | tail -1)
  echo "{\"when\":\"$stamp\",\"config\":\"$1\",\"result\":$line}" | tee -a "$OUT"
}
