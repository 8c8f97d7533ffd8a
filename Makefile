# The README's two commands: `make run` (main job on its embedded default) and `make test`.
# Both install what they need first; the install is skipped once done (a stamp file).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU wheel is taken only when no torch is importable: a GPU user's CUDA build is left alone.
TORCH_CPU ?= torch==2.13.0

.PHONY: install run test bench gpu-data

.stamp-install: pyproject.toml
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_CPU)"
	$(PIP) install -q -e ".[test,slurm,rl,logging,minari]"
	@touch $@

install: .stamp-install

run: .stamp-install
	$(PYTHON) tools/run.py

test: .stamp-install
	$(PYTHON) -m pytest -q

bench: .stamp-install
	$(PYTHON) tools/bench.py masked-step

# The data of tools/gpu_evidence.sh (MT10, 100 episodes per task), made on a CPU before a GPU is borrowed.
gpu-data: .stamp-install
	$(PYTHON) tools/run.py recipe=make_data data=mt10_near
