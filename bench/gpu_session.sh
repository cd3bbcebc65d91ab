#!/usr/bin/env bash
# The training benchmarks on a GPU machine that cannot reach PyPI or the raw images, in one command.
#
#   bash bench/gpu_session.sh tune       # 20-trial Optuna tune + 150-epoch final fit, timed; then, while
#                                        #   time remains, the same fit from a backbone pretrained on
#                                        #   every count. Needs .gpu/abid_all_224_q75.npz and .whl/
#   bash bench/gpu_session.sh tune-pretrained  # the pipeline's order, timed as a whole: 40-epoch stage on
#                                        #   every count, then the 20 trials and the 150-epoch fit from
#                                        #   its backbone. Needs .gpu/abid_all_224_q75.npz and .whl/
#   bash bench/gpu_session.sh pretrain   # accuracy: from scratch vs pretrained on every count, default
#                                        #   parameters, 100 epochs. Needs .gpu/abid_all_224_q75.npz
#   bash bench/gpu_session.sh ensemble   # accuracy: three seeds of the pretrained run, their ensemble and
#                                        #   one ResNet18 taught by them (~8 minutes). Needs
#                                        #   .gpu/abid_all_224_q75.npz
#   bash bench/gpu_session.sh decision   # accuracy: the ensemble mode's three seeds and their ensemble
#                                        #   with the count rule fitted on val (plain figures kept
#                                        #   beside; ~6 minutes). Needs .gpu/abid_all_224_q75.npz
#   bash bench/gpu_session.sh stages     # accuracy: three seeds, each from a stage of its own (40
#                                        #   epochs, the run's seed), their ensemble, every count rule
#                                        #   fitted on val beside the plain one (~8 minutes). Needs
#                                        #   .gpu/abid_all_224_q75.npz
#   bash bench/gpu_session.sh refit      # accuracy: the pretrained recipe's seeds, each also trained
#                                        #   again on train + val up to its val-chosen epoch; both
#                                        #   models tested (~7 minutes). Needs .gpu/abid_all_224_q75.npz
#   bash bench/gpu_session.sh contrastive  # accuracy: the pretrained recipe's seeds from a backbone
#                                        #   trained self-supervised instead (SimCLR, 200 epochs, batch
#                                        #   512, no labels; ~8 minutes). Needs .gpu/abid_all_224_q75.npz
#   bash bench/gpu_session.sh resolution # accuracy: the same ordinal run at 224 and at 288 px.
#                                        #   Needs .gpu/abid_288_q75.npz
#   bash bench/gpu_session.sh distill    # accuracy: two runs, their ensemble, and one ResNet18 taught
#                                        #   by both. Needs .gpu/abid_224_q90.npz
#   bash bench/gpu_session.sh stream     # speed: one epoch at 224 px with the training images held on
#                                        #   the GPU vs streamed from the uint8 cache (--data-on-device
#                                        #   always vs never; 20,000 random images, 3 GB; ~2 minutes).
#                                        #   Needs no pack
#
# `make gpu-prep` makes these files; what one mode carries stays under the 64 MiB limit (tune: 60 MiB
# with the repository).
# Results (JSON) go to $OUT when set, else bench/results/. Each mode fits in ~10 minutes on one
# H100/H200; copy the JSON into bench/results/ afterwards.
set -euo pipefail

mode=${1:-}
out=${OUT:-bench/results}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

need() {
  if [[ ! -f $1 ]]; then
    echo "error: $1 is missing; run 'make gpu-prep' on a machine with ../shared/abid and carry it" >&2
    exit 2
  fi
}

install_optuna() {
  if ! python3 -c "import optuna" 2>/dev/null; then
    compgen -G ".whl/*.whl" >/dev/null || { echo "error: no Optuna here and no .whl/ wheels (make gpu-prep)" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
}

python3 - <<'EOF' || true
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

case $mode in
  tune)
    need .gpu/abid_all_224_q75.npz
    install_optuna
    # The 0 and 6+ images of this pack stay out of the tune and the timed fit (train/val/test hold
    # classes 1-5 only); they feed the pretraining stage, started only if 360 s have not passed.
    # No trial starts after 420 s, so the final fit is measured within one 600 s call whatever
    # happens (the JSON then says how many trials ran and that the target is not met).
    python3 bench/train.py tune --pack .gpu/abid_all_224_q75.npz --out "$out" \
      --trials 20 --trial-epochs 15 --final-epochs 150 --tune-timeout 420 \
      --pretrain-epochs 40 --budget-s 360
    ;;
  tune-pretrained)
    need .gpu/abid_all_224_q75.npz
    install_optuna
    # Stage ~50 s + tune (no trial starts after 360 s of it) + fit: within one 600 s call.
    python3 bench/train.py tune --pack .gpu/abid_all_224_q75.npz --out "$out" \
      --trials 20 --trial-epochs 15 --final-epochs 150 --tune-timeout 360 \
      --pretrain-epochs 40 --pretrain-first --result-name train_gpu_tune_pretrained.json
    ;;
  pretrain)
    need .gpu/abid_all_224_q75.npz
    # Same pack, same split for both runs: the first starts from scratch, the second from the
    # backbone pretrained for 40 epochs on the training split plus the 0 and 6+ images (~4 minutes).
    python3 bench/train.py gpu --pack .gpu/abid_all_224_q75.npz --out "$out" --bench-batch \
      --compile-below 0 --epochs 100 --tta --pretrain-epochs 40 --budget-s 150 \
      --result-name train_gpu_pretrain.json --runs "ordinal:weights=none" "ordinal"
    ;;
  ensemble)
    need .gpu/abid_all_224_q75.npz
    # The pretrain mode's recipe from one shared backbone (40 epochs on every count), three seeds:
    # how much of its gain is the seed, what averaging them adds, and whether one student keeps it.
    python3 bench/train.py gpu --pack .gpu/abid_all_224_q75.npz --out "$out" --bench-batch \
      --compile-below 0 --epochs 100 --tta --pretrain-epochs 40 --ensemble --distill \
      --budget-s 260 --distill-budget-s 340 --result-name train_gpu_ensemble.json \
      --runs "ordinal:seed=1" "ordinal:seed=2" "ordinal:seed=3"
    ;;
  decision)
    need .gpu/abid_all_224_q75.npz
    # The ensemble mode's runs (same pack, split, stage and seeds), each with its count rule fitted
    # on val: the plain ordinal rule under-counts 5 (19 % of them right in train_gpu_ensemble.json).
    python3 bench/train.py gpu --pack .gpu/abid_all_224_q75.npz --out "$out" --bench-batch \
      --compile-below 0 --epochs 100 --tta --pretrain-epochs 40 --ensemble --decision fitted \
      --budget-s 300 --result-name train_gpu_decision.json \
      --runs "ordinal:seed=1" "ordinal:seed=2" "ordinal:seed=3"
    ;;
  stages)
    need .gpu/abid_all_224_q75.npz
    # The ensemble mode's members shared one backbone and their average gained nothing; here each
    # run pretrains its own (a stage per seed), then the ensemble, all with fitted count rules.
    python3 bench/train.py gpu --pack .gpu/abid_all_224_q75.npz --out "$out" --bench-batch \
      --compile-below 0 --epochs 100 --tta --pretrain-epochs 40 --pretrain-per-run --ensemble \
      --decision fitted --budget-s 300 --result-name train_gpu_stages.json \
      --runs "ordinal:seed=1" "ordinal:seed=2" "ordinal:seed=3"
    ;;
  refit)
    need .gpu/abid_all_224_q75.npz
    # The pretrained recipe (one 40-epoch stage, 100-epoch fits, flips), each run then trained again
    # on train + val up to the epoch val chose: the selected model's and the refit's test figures,
    # paired, per seed (~160 s a seed; a third seed only if it starts before 300 s).
    python3 bench/train.py gpu --pack .gpu/abid_all_224_q75.npz --out "$out" --bench-batch \
      --compile-below 0 --epochs 100 --tta --pretrain-epochs 40 --refit --budget-s 300 \
      --result-name train_gpu_refit.json --runs "ordinal:seed=1" "ordinal:seed=2" "ordinal:seed=3"
    ;;
  contrastive)
    need .gpu/abid_all_224_q75.npz
    # The refit mode's recipe (100-epoch fits, flips, seeds 1 and 2), its backbone learned without
    # labels: SimCLR views of the training split plus the 0 and 6+ images, 200 epochs at batch 512
    # (~5 minutes), the k-NN val accuracy of its features recorded each epoch.
    python3 bench/train.py gpu --pack .gpu/abid_all_224_q75.npz --out "$out" --bench-batch \
      --compile-below 0 --epochs 100 --tta --pretrain-epochs 200 --pretrain-objective contrastive \
      --pretrain-batch-size 512 --budget-s 420 --result-name train_gpu_contrastive.json \
      --runs "ordinal:seed=1" "ordinal:seed=2"
    ;;
  resolution)
    need .gpu/abid_288_q75.npz
    # ABID photos are 250-600 px on a side: does counting gain from more of them than 224 px keeps?
    # One pack (288 px), one split; the 224 px run resizes the same frames down.
    python3 bench/train.py gpu --pack .gpu/abid_288_q75.npz --out "$out" --bench-batch \
      --compile-below 0 --epochs 150 --tta --budget-s 300 --result-name train_gpu_resolution.json \
      --runs "ordinal:image_size=224" "ordinal:image_size=288"
    ;;
  distill)
    need .gpu/abid_224_q90.npz
    # The recorded runs' pack and recipe (ordinal, EMA, flips, 150 epochs): two teachers, their
    # ensemble in one graph, then a student trained on the same augmented views to match them.
    python3 bench/train.py gpu --pack .gpu/abid_224_q90.npz --out "$out" --bench-batch \
      --compile-below 0 --epochs 150 --tta --ensemble --distill --budget-s 200 --distill-budget-s 330 \
      --result-name train_gpu_distill.json --runs "ordinal:seed=1" "ordinal:seed=2"
    ;;
  stream)
    # bench/stream.py: random pixels (the speed does not depend on them), made on the machine; each
    # mode's first pass reads the disk (--cold drops the file's pages), twice each, alternating.
    python3 bench/stream.py --device cuda --synthetic 20000 --image-size 224 --batch-size 256 --cold \
      --work /tmp/bench_stream --out "$out/stream_gpu.json"
    ;;
  *)
    echo "usage: bash bench/gpu_session.sh tune|tune-pretrained|pretrain|ensemble|decision|stages|refit|contrastive|resolution|distill|stream" >&2
    exit 2
    ;;
esac
