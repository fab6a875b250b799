#!/usr/bin/env bash
# A Hydra multirun sweep: coreset selection by Diff-In (training target) against random and EL2N,
# at two kept fractions and two seeds (12 jobs), then the aggregation into a table and a plot.
#
#   bash examples/coreset_sweep.sh [sweep_dir] [extra Hydra overrides...]     # needs: pip install -e ".[data,plots]"
#   bash examples/coreset_sweep.sh /tmp/sweep trainer.max_epochs=2             # a quick one
#
# Each job is one Hydra run directory (report.json, scores.pt); the aggregation reads them all and
# writes aggregate.md, aggregate.csv and accuracy_vs_fraction.png into the sweep directory.
# experiment=coreset_sweep is the full preset (5 methods x 4 fractions x 3 seeds).
set -euo pipefail
SWEEP_DIR=${1:-multirun/coreset_example}
shift || true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m lightning_influence -m \
    recipe=coreset estimator=diffin,random,el2n recipe.fraction=0.2,0.5 seed=0,1 \
    'recipe.seeds=[${seed}]' recipe.class_balanced=true recipe.budget=steps data.label_noise=0 recipe.plots=false \
    hydra.sweep.dir="$SWEEP_DIR" "$@"
python -m lightning_influence.recipes.aggregate "$SWEEP_DIR"
cat "$SWEEP_DIR/aggregate.md"
