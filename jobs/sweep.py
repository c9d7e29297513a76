"""Ray job entrypoint: run a sweep on the cluster this job was submitted to.

    ray job submit --working-dir . -- python jobs/sweep.py jobs/configs/pythia-70m.yaml [--set train.lr=1e-4 ...]

`ray job submit` sets RAY_ADDRESS for the entrypoint, so `run_sweep` joins the running
cluster instead of starting a local one. Install sae-ray on the cluster's nodes (or pass
`--runtime-env-json '{"pip": ["sae-ray"]}'`); point `tracking.uri` at an MLflow server
and `buffer.path` at storage every node sees.
"""

import sys

from sae_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
