"""DVC stage ``check_params``: every section of params.yaml checked before any stage runs.

``dvc repro`` deletes a stage's outputs right before running it, so a params error found by
the stage itself costs its outputs (and ``cache: false`` metrics cannot be restored). Every
other stage depends on this one's output, so DVC runs it first whenever params.yaml changes:
a missing section, an unknown key or section, a wrong type or an out-of-range value stops
``dvc repro`` here, before anything is deleted. Its output holds only the names of the
sections checked, so a valid change of a value does not by itself rerun the other stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ParamsError
from ..evaluation.config import ClassifierParams, EvaluateParams, FitParams, ZeroShotParams
from ..files import write_json
from ..images import DataParams
from ..params import load
from ..stage import stage_main
from ..tokenizer.config import EncodeParams, load_tokenizer_params
from ..training.config import TrainParams, load_train_var_config

SECTIONS = ("data", "tokenizer", "encode_tokens", "var", "train", "classifier", "evaluate", "zeroshot", "fit",
            "execution")


@dataclass(frozen=True)
class Paths:
    out: Path        # runs/params-check.json (the sections checked; every stage depends on it)


def load_config(params: dict[str, Any], file: str, paths: Paths) -> dict[str, Any]:
    """Load every section the stages load, as they load it (unknown top-level sections are errors);
    returns the params, checked (the stage's MLflow run logs them all)."""
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"{file}: unknown section(s) {unknown}; the sections are {list(SECTIONS)}")
    load(DataParams, params, "data", file)
    load_tokenizer_params(params, file)
    load(EncodeParams, params, "encode_tokens", file)
    train = load(TrainParams, params, "train", file)
    for depth in train.depths:   # the var and execution sections, with each depth's derived widths
        load_train_var_config(params, file, depth)
    load(ClassifierParams, params, "classifier", file)
    load(EvaluateParams, params, "evaluate", file)
    zeroshot = load(ZeroShotParams, params, "zeroshot", file)
    if zeroshot.depth not in train.depths:
        raise ParamsError(f"{file}:zeroshot.depth: {zeroshot.depth} is not one of train.depths {list(train.depths)}")
    load(FitParams, params, "fit", file)
    return params


def run(params: dict[str, Any], paths: Paths) -> dict[str, Any]:
    write_json(paths.out, {"checked": list(SECTIONS)})
    return {"sections": len(SECTIONS)}


main = stage_main("check_params", Paths, load_config, run, summary_keys=("sections",), doc=__doc__)

if __name__ == "__main__":
    main()
