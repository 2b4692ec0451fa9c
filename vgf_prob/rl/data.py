"""The offline-RL data layer: one transition store and the loaders that fill it.

- `OfflineDataset` (`vgf_prob.rl.offline_dataset`): ``(s, a, r, s', mask)`` tensors on one device,
  seeded sampling, `append` for offline-to-online fine-tuning, ``state_dict``, ``summary``.
- D4RL HDF5 files (`vgf_prob.rl.d4rl`): `load_d4rl_hdf5`, `load_d4rl`, `d4rl_normalized_score`,
  `D4RL_REF_SCORES`.
- Minari local store (`vgf_prob.rl.minari_data`): `load_minari`.
- OGBench single-task datasets (`vgf_prob.rl.ogbench_data`): `load_ogbench`.
- OGBench 'play' data from ogbench's scripted oracles (`vgf_prob.rl.ogbench_generate`):
  `generate_ogbench_dataset`, `ensure_ogbench_dataset`.

Every loader reads local files only; nothing here downloads. Heavy dependencies (h5py, minari, ogbench,
gymnasium) are imported when a loader is called, so importing this module is cheap.
"""

from vgf_prob.rl.d4rl import D4RL_REF_SCORES, d4rl_normalized_score, load_d4rl, load_d4rl_hdf5
from vgf_prob.rl.minari_data import load_minari
from vgf_prob.rl.offline_dataset import OfflineDataset
from vgf_prob.rl.ogbench_data import load_ogbench
from vgf_prob.rl.ogbench_generate import ensure_ogbench_dataset, generate_ogbench_dataset

__all__ = [
    "D4RL_REF_SCORES",
    "OfflineDataset",
    "d4rl_normalized_score",
    "ensure_ogbench_dataset",
    "generate_ogbench_dataset",
    "load_d4rl",
    "load_d4rl_hdf5",
    "load_minari",
    "load_ogbench",
]
