#!/usr/bin/env bash
# Install the peer libraries used only by tests/peers and bench/ (never at runtime) into .venv,
# without letting them replace torch or downgrade numpy (pyDVL pins numpy<2; kronfluence wants torchvision;
# bergson wants torchvision/torchaudio builds for another torch, which break transformers' import, so it
# gets only what its MAGIC trainer imports).
set -euo pipefail
cd "$(dirname "$0")/.."
pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
.venv/bin/python -c "import torch, numpy; print(f'torch=={torch.__version__.split(\"+\")[0]}'); print(f'numpy=={numpy.__version__}')" > "$pin"
pip=(.venv/bin/python -m pip install --quiet -c "$pin")
"${pip[@]}" captum==0.9.0 traker==0.3.2 dattri==0.3.0 \
  cloudpickle cvxpy joblib more-itertools numcodecs pandas psutil pyDeprecate tqdm distributed dask \
  accelerate einops einconv opt-einsum "zarr<3"
"${pip[@]}" --no-deps pyDVL==0.10.0 kronfluence==1.0.1
"${pip[@]}" datasets==5.2.0 transformers==5.25.0 peft==0.21.2 optree==0.20.0 simple-parsing==0.1.9 \
  ml_dtypes==0.7.0 petname==2.9 jaxtyping==0.3.11 graphviz==0.21
"${pip[@]}" --no-deps bergson==2.5.1 torchopt==0.7.3
