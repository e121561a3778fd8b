"""Model-side commands of `migraine-node`: synth, train, evaluate, predict,
import-weights, demo-model. Registered by node/cli.py; heavy imports happen
inside each command so the node's admin commands stay fast.

Imports nothing from node/ or storage/ (tests/model/test_layering.py): the
node's series selection rules reach `predict` through `register(...,
select_series=...)`, and a ModelCommandError is reported here (exit 1).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SeriesSelector = Callable[[Sequence[Any]], Any]
"""Datasets of one series -> a decision with `.accepted` and `.reason` (the node passes its selection rules)."""


class ModelCommandError(Exception):
    """A model command failed for a reason the user can fix (bad input, refused series)."""


def _reported(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Exit status 1 and the reason on stderr for a ModelCommandError, as the node's commands do."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except ModelCommandError as exc:
            print(f"migraine-node: {exc}", file=sys.stderr)
            return 1

    return run


def _spec(text: str | None):  # noqa: ANN202
    from model.preprocess import PAPER_SPEC, InputSpec

    if text is None:
        return PAPER_SPEC
    try:
        return InputSpec.parse(text)
    except (ValueError, KeyError) as exc:
        raise ModelCommandError(f"--input-spec: {exc}") from None


def cmd_synth(args: argparse.Namespace) -> int:
    from model.synth import write_series

    series = write_series(Path(args.out_dir), slices=args.slices, orientation=args.orientation,
                          responder=args.responder, enhanced=args.enhanced, seed=args.seed)
    kind = "one Legacy Converted Enhanced MR object" if args.enhanced else f"{len(series.paths)} MR slices"
    print(f"wrote {kind} to {args.out_dir} (synthetic, {'responder' if args.responder else 'non-responder'} "
          f"phantom; StudyInstanceUID {series.study_instance_uid}, SeriesInstanceUID {series.series_instance_uid})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from model.dataset import ManifestError, assign_splits, load_tensors, read_manifest
    from model.train import TrainConfig, train

    spec = _spec(args.input_spec)
    try:
        rows = assign_splits(read_manifest(Path(args.manifest)), args.seed)
        with tqdm(total=len(rows), desc="preprocessing", file=sys.stderr) as bar:
            items = load_tensors(rows, spec, progress=bar.update)
    except ManifestError as exc:
        raise ModelCommandError(str(exc)) from None
    train_items = [item for item, row in zip(items, rows) if row.split == "train"]
    test_items = [item for item, row in zip(items, rows) if row.split == "test"]
    if len({y for _, y in train_items}) < 2:
        raise ModelCommandError("the training split needs both responders and non-responders")
    config = TrainConfig(architecture=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, augment=not args.no_augment, cutoff=args.cutoff, device=args.device)
    info = train(train_items, test_items, spec, config, Path(args.out), name=args.name or f"{args.arch}-site",
                 synthetic=False, resume=args.resume,
                 extra_summary={"manifest": str(Path(args.manifest).resolve())})
    print(f"checkpoint {args.out}: {info.model_id}, best epoch {info.training.get('best_epoch')}, "
          f"test AUC {info.training.get('test_auc')}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from model.dataset import ManifestError, load_tensors, read_manifest
    from model.evaluate import read_predictions, report

    try:
        if args.predictions:
            labels, scores = read_predictions(Path(args.predictions))
            cutoff, title = None, f"predictions {Path(args.predictions).name}"
        else:
            if not args.checkpoint:
                raise ModelCommandError("give --checkpoint DIR (with --manifest) or --predictions CSV")
            from model.predict import Predictor

            predictor = Predictor(Path(args.checkpoint), device=args.device)
            rows = read_manifest(Path(args.manifest))
            if args.split != "all":
                rows = [r for r in rows if (r.split or "test") == args.split]
            items = load_tensors(rows, predictor.info.input_spec)
            labels = [y for _, y in items]
            scores = [predictor.predict_tensor(x).probability for x, _ in items]
            cutoff, title = predictor.info.cutoff, predictor.info.model_id
        text, _ = report(labels, scores, cutoff, Path(args.out) if args.out else None, title)
    except (ManifestError, ValueError) as exc:
        raise ModelCommandError(str(exc)) from None
    print(text)
    if args.out:
        print(f"\nwrote {args.out}/metrics.json, roc.png, predictions.csv")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from model.checkpoint import CheckpointError
    from model.predict import Predictor
    from model.volume import VolumeError, assemble_volume, read_series_dir

    select_series: SeriesSelector | None = getattr(args, "select_series", None)
    try:
        predictor = Predictor(Path(args.checkpoint), device=args.device)
        datasets = read_series_dir(Path(args.series_dir))
        if not args.no_select:
            if select_series is None:
                raise ModelCommandError("no series selection rules registered (use --no-select to classify anyway)")
            decision = select_series(datasets)
            if not decision.accepted:
                raise ModelCommandError(f"series refused: {decision.reason} (use --no-select to classify anyway)")
        volume = assemble_volume(datasets)
    except (VolumeError, CheckpointError) as exc:
        raise ModelCommandError(str(exc)) from None
    prediction = predictor.predict_volume(volume)
    if args.json:
        print(json.dumps(prediction.to_json(), indent=2))
    else:
        note = " (SYNTHETIC DEMO MODEL)" if prediction.synthetic else ""
        print(f"{prediction.label}: probability of NSAID response {prediction.probability:.3f} "
              f"(cutoff {prediction.cutoff:.2f}), model {prediction.model_id}{note}, {prediction.device}, "
              f"{prediction.ms:.0f} ms. Research use only.")
    return 0


def cmd_import_weights(args: argparse.Namespace) -> int:
    from model.checkpoint import CheckpointError
    from model.weights import import_state_dict

    try:
        info = import_state_dict(Path(args.state_dict), args.arch, Path(args.out), cutoff=args.cutoff,
                                 input_spec=_spec(args.input_spec), name=args.name)
    except (CheckpointError, ValueError) as exc:
        raise ModelCommandError(str(exc)) from None
    print(f"checkpoint {args.out}: {info.model_id} ({info.architecture}, cutoff {info.cutoff})")
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from model.demo import build_demo_model

    info = build_demo_model(Path(args.out), **({} if args.epochs is None else {"epochs": args.epochs}))
    print(f"synthetic demo model {info.model_id} in {args.out}: held-out synthetic test AUC "
          f"{info.training.get('test_auc')} (planted synthetic feature; no clinical meaning)")
    return 0


def register(
    sub: argparse._SubParsersAction, common: argparse.ArgumentParser, select_series: SeriesSelector | None = None
) -> None:
    """Add the model commands; `select_series` is the node's series selection (`predict` applies it)."""
    from model.names import ARCHITECTURES

    p = sub.add_parser("synth", parents=[common], help="write a synthetic Philips-like 3D T1 study")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--enhanced", action="store_true", help="one multi-frame (Legacy Converted Enhanced MR) object")
    p.add_argument("--orientation", choices=["sag", "ax", "obl"], default="sag")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--responder", action="store_true", help="plant the synthetic responder feature")
    group.add_argument("--non-responder", dest="responder", action="store_false")
    p.add_argument("--slices", type=int, default=170)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_reported(cmd_synth))

    p = sub.add_parser("train", parents=[common], help="train a network from a dataset manifest")
    p.add_argument("--manifest", required=True, metavar="CSV", help="rows path,label[,split]")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--arch", choices=ARCHITECTURES, default="resnet18")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cutoff", type=float, default=0.5)
    p.add_argument("--input-spec", help="JSON or 'spacing=1,1,1;shape=170,256,256;orientation=RAS' (default: the paper's)")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train-state.pt")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--name", help="model name recorded in the checkpoint")
    p.set_defaults(func=_reported(cmd_train))

    p = sub.add_parser("evaluate", parents=[common], help="the paper's metrics (AUC with DeLong CI, ...)")
    p.add_argument("--manifest", metavar="CSV")
    p.add_argument("--checkpoint", metavar="DIR")
    p.add_argument("--predictions", metavar="CSV", help="columns label,probability (predictions made elsewhere)")
    p.add_argument("--split", choices=["test", "train", "all"], default="all", help="manifest rows to use")
    p.add_argument("--out", metavar="DIR", help="write metrics.json, roc.png, predictions.csv")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.set_defaults(func=_reported(cmd_evaluate))

    p = sub.add_parser("predict", parents=[common], help="classify one series folder outside the node")
    p.add_argument("series_dir", metavar="SERIES_DIR")
    p.add_argument("--checkpoint", required=True, metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-select", action="store_true", help="skip the 3D T1 selection rules")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.set_defaults(func=_reported(cmd_predict), select_series=select_series)

    p = sub.add_parser("import-weights", parents=[common], help="wrap a 3D-ResNets state_dict as a checkpoint")
    p.add_argument("state_dict", metavar="STATE_DICT")
    p.add_argument("--arch", choices=ARCHITECTURES, required=True)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--cutoff", type=float, default=0.5)
    p.add_argument("--input-spec")
    p.add_argument("--name")
    p.set_defaults(func=_reported(cmd_import_weights))

    p = sub.add_parser("demo-model", parents=[common], help="train the synthetic demo model (about a minute on CPU)")
    p.add_argument("--out", default="migraine-node-data/models/demo", metavar="DIR")
    p.add_argument("--epochs", type=int, default=None, help="at most this many epochs (default 14; "
                   "training stops earlier once the validation heads are separated)")
    p.set_defaults(func=_reported(cmd_demo_model))
