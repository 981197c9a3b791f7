#!/bin/sh
# Worker of bench/restart/torchrun.sh (the same logic as restart-latency's job).
if [ "$TORCHELASTIC_RESTART_COUNT" = 1 ]; then date +%s%N > "$OUT/start-$TRIAL-$RANK"; exit 0; fi
if [ "$RANK" = 2 ]; then sleep 0.5; date +%s%N > "$OUT/exit-$TRIAL"; exit 1; fi
exec sleep 60
