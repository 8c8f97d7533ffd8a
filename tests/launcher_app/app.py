"""A minimal Hydra app swept through ``hydra/launcher=local`` by tests/test_launcher.py: each job
records what it was given (its GPU visibility, ``threads``, start and end times) and sleeps."""

import json
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's hydra_plugins


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    start = time.time()
    time.sleep(float(cfg.sleep_s))
    if int(cfg.job) in list(cfg.fail_jobs):
        raise RuntimeError(f"job {cfg.job} fails as asked")
    out = Path(cfg.record_dir) / f"{cfg.job}.json"
    out.write_text(json.dumps({"job": int(cfg.job), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                               "threads": cfg.threads, "start": start, "end": time.time()}))


if __name__ == "__main__":
    main()
