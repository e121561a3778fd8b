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

    from model.dataset import ROLES, ManifestError, assign_roles, load_tensors, read_manifest, split_record
    from model.train import TrainConfig, train

    if args.folds is not None and args.folds < 2:
        print("migraine-node: --folds needs at least 2 folds", file=sys.stderr)
        return 2
    spec = _spec(args.input_spec)
    manifest = str(Path(args.manifest).resolve())
    try:
        rows = read_manifest(Path(args.manifest), warn=lambda line: print(f"warning: {line}", file=sys.stderr))
        if args.folds is None:
            rows, method = assign_roles(rows, args.seed)
            for role in ("train", "validation"):  # checked before preprocessing, not after
                ys = [r.label for r in rows if r.split == role]
                if len(set(ys)) < 2:
                    raise ModelCommandError(f"the {role} split needs both responders and non-responders "
                                            f"({len(ys)} rows, {sum(ys)} responders)")
        elif any(r.split for r in rows):
            raise ModelCommandError("--folds makes its own patient-grouped folds: remove the manifest's split column")
        else:
            from model.cv import plan_folds

            plan_folds(rows, args.folds, args.seed)  # every fold checked before anything is preprocessed or trained
        with tqdm(total=len(rows), desc="preprocessing", file=sys.stderr) as bar:
            items = load_tensors(rows, spec, progress=bar.update)
    except (ManifestError, ValueError) as exc:
        raise ModelCommandError(str(exc)) from None
    config = TrainConfig(architecture=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, augment=not args.no_augment, cutoff=args.cutoff, device=args.device)
    name = args.name or f"{args.arch}-site"
    try:
        if args.folds is not None:
            from model.cv import format_cv, run_cross_validation

            pooled, folds, _ = run_cross_validation(rows, items, spec, config, Path(args.out), args.folds, name=name,
                                                    manifest=manifest, resume=args.resume)
            print(format_cv(pooled, folds, args.folds))
            print(f"\nwrote {args.out}/cv.json, cv_predictions.csv, roc.png, reliability.png and "
                  f"fold-1 ... fold-{args.folds}/ (one checkpoint per fold)")
            return 0
        split = split_record(rows, method)
        by_role = {role: [item for item, row in zip(items, rows) if row.split == role] for role in ROLES}
        info = train(by_role["train"], by_role["validation"], spec, config, Path(args.out),
                     test_items=by_role["test"] or None, name=name, synthetic=False, resume=args.resume,
                     extra_summary={"manifest": manifest, "split": split})
    except ValueError as exc:
        raise ModelCommandError(str(exc)) from None
    t, counts = info.training, split["counts"]
    print(f"checkpoint {args.out}: {info.model_id}")
    print("split by patient: " + "; ".join(f"{role} {c['rows']} rows of {c['patients']} patients "
                                           f"({c['responders']} responder rows)" for role, c in counts.items()))
    print(f"best epoch {t.get('best_epoch')} by validation AUC {t.get('validation_auc')}; cutoff {info.cutoff:.3f} "
          f"({t.get('cutoff_rule')})")
    if t.get("test_auc_ci"):
        low, high = ("n/a" if v is None else v for v in t["test_auc_ci"])
        print(f"test AUC {t['test_auc']} (95% CI {low}-{high}) on {t['n_test']} rows, scored once with that "
              f"checkpoint; at its cutoff: accuracy {t['test_at_cutoff']['accuracy']}, sensitivity "
              f"{t['test_at_cutoff']['sensitivity']}, specificity {t['test_at_cutoff']['specificity']}")
    elif by_role["test"]:
        print(f"test: {t.get('test_note')}")
    else:
        print("no test rows: nothing was held out for a final estimate (consider --folds)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from collections import Counter

    from model.dataset import ManifestError, load_tensors, read_manifest
    from model.evaluate import SavedSplit, checkpoint_status, legacy_split, read_predictions, report, select_rows

    out = Path(args.out) if args.out else None
    try:
        if args.predictions:
            if args.checkpoint or args.manifest:
                raise ModelCommandError("--predictions takes neither --checkpoint nor --manifest")
            labels, scores = read_predictions(Path(args.predictions))
            text, _ = report(labels, scores, args.cutoff, out, f"predictions {Path(args.predictions).name}",
                             cutoff_source="given", evaluated="predictions made elsewhere: not checked against any "
                             "training split")
        else:
            if not args.checkpoint or not args.manifest:
                raise ModelCommandError("give --checkpoint DIR with --manifest CSV, or --predictions CSV")
            if args.cutoff is not None:
                raise ModelCommandError("--cutoff is for --predictions; with a checkpoint its own cutoff is used")
            from model.checkpoint import load_checkpoint
            from model.predict import resolve_device
            from model.train import predict_scores

            # The reference forward pass (torch): metrics describe the checkpoint's weights.
            model, info = load_checkpoint(Path(args.checkpoint))
            rows = read_manifest(Path(args.manifest), warn=lambda line: print(f"warning: {line}", file=sys.stderr))
            saved = SavedSplit.from_training(info.training)
            if legacy_split(info.training):
                print("warning: the checkpoint's split was recorded before content digests and keyed pseudonyms; "
                      "its rows cannot be matched, so every row is unverified", file=sys.stderr)
            split = args.split or ("test" if saved else "all")
            status = checkpoint_status(rows, saved)
            selection = select_rows(rows, status, split, any(r.split for r in rows))
            if not selection.indices:
                known = ", ".join(f"{n} {k}" for k, n in sorted(Counter(s.role for s in status).items()))
                raise ModelCommandError(f"no {split} rows to evaluate in {args.manifest} (its {len(rows)} rows, "
                                        f"by the checkpoint's split: {known})")
            chosen = [rows[i] for i in selection.indices]
            items = load_tensors(chosen, info.input_spec)
            labels = [y for _, y in items]
            device = resolve_device(args.device)
            scores = predict_scores(model.to(device), [x for x, _ in items], device)
            evaluated = selection.label
            if selection.set_aside:
                evaluated += f"; {selection.set_aside} other manifest row(s) not evaluated"
            row_info = [{"line": rows[i].line, "patient": rows[i].patient, "role": status[i].role}
                        for i in selection.indices]
            text, _ = report(labels, scores, info.cutoff, out, info.model_id, evaluated=evaluated,
                             row_info=row_info)
    except (ManifestError, ValueError) as exc:
        raise ModelCommandError(str(exc)) from None
    print(text)
    if args.out:
        print(f"\nwrote {args.out}/metrics.json, roc.png, reliability.png, predictions.csv")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from model.checkpoint import CheckpointError
    from model.predict import Predictor
    from model.runtime import RuntimeUnavailable
    from model.volume import VolumeError, assemble_volume, read_series_dir

    select_series: SeriesSelector | None = getattr(args, "select_series", None)
    try:
        predictor = Predictor(Path(args.checkpoint), device=args.device, runtime=args.runtime)
        datasets = read_series_dir(Path(args.series_dir))
        if not args.no_select:
            if select_series is None:
                raise ModelCommandError("no series selection rules registered (use --no-select to classify anyway)")
            decision = select_series(datasets)
            if not decision.accepted:
                raise ModelCommandError(f"series refused: {decision.reason} (use --no-select to classify anyway)")
        volume = assemble_volume(datasets)
    except (VolumeError, CheckpointError, RuntimeUnavailable) as exc:
        raise ModelCommandError(str(exc)) from None
    prediction = predictor.predict_volume(volume)
    if args.json:
        print(json.dumps(prediction.to_json(), indent=2))
    else:
        note = " (SYNTHETIC DEMO MODEL)" if prediction.synthetic else ""
        print(f"{prediction.label}: probability of NSAID response {prediction.probability:.3f} "
              f"(cutoff {prediction.cutoff:.2f}), model {prediction.model_id}{note}, {prediction.device} "
              f"({prediction.runtime}), {prediction.ms:.0f} ms. Research use only.")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    """Write exactly what the network sees for a series (the predictor's own preprocessing)."""
    from nibabel.filebasedimages import ImageFileError

    from model.checkpoint import CheckpointError, read_info
    from model.preprocess import build_transform
    from model.preview import write_nifti, write_three_planes
    from model.volume import VolumeError, load_volume

    out = Path(args.out)
    if not out.name.endswith((".nii", ".nii.gz")):
        raise ModelCommandError(f"--out {out}: give a file name ending in .nii.gz or .nii")
    try:
        info = read_info(Path(args.checkpoint))
        volume = load_volume(Path(args.series))
        preprocessed = build_transform(info.input_spec)(volume)
    except (VolumeError, CheckpointError, ValueError) as exc:
        raise ModelCommandError(str(exc)) from None
    except (OSError, EOFError, ImageFileError) as exc:  # a truncated or corrupt NIfTI file
        raise ModelCommandError(f"{args.series}: cannot be read as a series or NIfTI image: {exc}") from None
    try:
        write_nifti(preprocessed, out)
    except OSError as exc:
        raise ModelCommandError(f"--out {out}: cannot be written: {exc.strerror or exc}") from None
    spec = info.input_spec
    centre = ", ".join(f"{v:.1f}" for v in preprocessed.head_centre_ras)
    print(f"wrote {out}: {'x'.join(map(str, spec.shape))} at {'x'.join(f'{v:g}' for v in spec.spacing)} mm "
          f"({spec.orientation}, {spec.normalisation}), grid centred on the "
          f"{'head' if spec.centring == 'head' else 'field of view'} at RAS ({centre}) mm; model {info.model_id}")
    if args.png:
        write_three_planes(preprocessed, Path(args.png), title=f"network input for {info.model_id}")
        print(f"wrote {args.png}")
    return 0


def cmd_import_weights(args: argparse.Namespace) -> int:
    from model.checkpoint import CheckpointError
    from model.weights import import_state_dict

    try:
        info = import_state_dict(Path(args.state_dict), args.arch, Path(args.out), cutoff=args.cutoff,
                                 input_spec=_spec(args.input_spec), name=args.name,
                                 responder_index=args.responder_index)
    except (CheckpointError, ValueError) as exc:
        raise ModelCommandError(str(exc)) from None
    print(f"checkpoint {args.out}: {info.model_id} ({info.architecture}, cutoff {info.cutoff}, responder = imported "
          f"output {args.responder_index})")
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
    p.add_argument("--manifest", required=True, metavar="CSV", help="rows path,label[,patient][,split]")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--arch", choices=ARCHITECTURES, default="resnet18")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cutoff", type=float, default=None,
                   help="fixed cutoff (default: the validation set's Youden midpoint at the chosen epoch)")
    p.add_argument("--folds", type=int, metavar="K", help="patient-grouped, stratified, nested K-fold "
                   "cross-validation: OUT/cv.json, cv_predictions.csv, roc.png, one checkpoint per fold")
    p.add_argument("--input-spec", help="JSON or 'spacing=1,1,1;shape=170,256,256;orientation=RAS' (default: the paper's)")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train-state.pt; with --folds, reuse the folds already finished with the same settings")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--name", help="model name recorded in the checkpoint")
    p.set_defaults(func=_reported(cmd_train))

    p = sub.add_parser("evaluate", parents=[common], help="the paper's metrics (AUC with DeLong CI, ...)")
    p.add_argument("--manifest", metavar="CSV")
    p.add_argument("--checkpoint", metavar="DIR")
    p.add_argument("--predictions", metavar="CSV", help="columns label,probability (predictions made elsewhere)")
    p.add_argument("--split", choices=["test", "validation", "train", "all"], default=None,
                   help="test (default when the checkpoint saved its split): held-out and external rows only, "
                   "refusing rows the model was trained or tuned on; all: every row, not a test estimate")
    p.add_argument("--cutoff", type=float, help="with --predictions: the cutoff fixed before seeing these rows")
    p.add_argument("--out", metavar="DIR", help="write metrics.json, roc.png, reliability.png, predictions.csv")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.set_defaults(func=_reported(cmd_evaluate))

    p = sub.add_parser("predict", parents=[common], help="classify one series folder outside the node")
    p.add_argument("series_dir", metavar="SERIES_DIR")
    p.add_argument("--checkpoint", required=True, metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-select", action="store_true", help="skip the 3D T1 selection rules")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--runtime", choices=["auto", "torch", "onnxruntime", "openvino"], default="auto",
                   help="what computes the forward pass (as [model] runtime; the ONNX export is not cached here)")
    p.set_defaults(func=_reported(cmd_predict), select_series=select_series)

    p = sub.add_parser("import-weights", parents=[common], help="wrap a 3D-ResNets state_dict as a checkpoint")
    p.add_argument("state_dict", metavar="STATE_DICT")
    p.add_argument("--arch", choices=ARCHITECTURES, required=True)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--cutoff", type=float, default=0.5)
    p.add_argument("--responder-index", type=int, choices=[0, 1], required=True,
                   help="which output of the imported final layer is the responder class (the authors' code does "
                   "not say); with 0 the two outputs are swapped so that ours is 1")
    p.add_argument("--input-spec")
    p.add_argument("--name")
    p.set_defaults(func=_reported(cmd_import_weights))

    p = sub.add_parser("preprocess", parents=[common],
                       help="write the network's input for a series (NIfTI with its affine, optional PNG)")
    p.add_argument("series", metavar="SERIES", help="a series folder, one multi-frame file or a NIfTI file")
    p.add_argument("--checkpoint", required=True, metavar="CK", help="its input spec decides the preprocessing")
    p.add_argument("--out", required=True, metavar="FILE.nii.gz")
    p.add_argument("--png", metavar="FILE.png", help="also a three-plane picture through the grid centre")
    p.set_defaults(func=_reported(cmd_preprocess))

    p = sub.add_parser("demo-model", parents=[common], help="train the synthetic demo model (about a minute on CPU)")
    p.add_argument("--out", default="migraine-node-data/models/demo", metavar="DIR")
    p.add_argument("--epochs", type=int, default=None, help="at most this many epochs (default 14; "
                   "training stops earlier once the validation heads are separated)")
    p.set_defaults(func=_reported(cmd_demo_model))
