"""Classification worker: its own process, started by `serve`.

Claims queued jobs atomically and runs volume -> preprocess -> predict ->
report for each, recording per-stage timings and the model id on the job. The
model is loaded once per worker process. When `[model] checkpoint` is not set
the synthetic demo model is used, built on first use.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom

from node.config import Settings, load_settings
from node.dimse_tuning import disable_pydicom_validation
from node.logs import log_context, setup_logging
from storage.db import make_engine
from storage.jobs import ClaimedJob, JobQueue, ResultFile
from storage.spool import Spool, SpoolKey

log = logging.getLogger(__name__)
POLL_SECONDS = 0.25
PIXEL_DATA = 0x7FE00010


def model_directory(settings: Settings, progress: bool = False) -> Path:
    """The configured checkpoint, or the demo model (built now if missing).

    With `progress` the build is narrated on stdout (the demo), otherwise in the log.
    It is built in a side folder and moved into place when finished, so an
    interrupted build is never taken for a model.
    """
    if settings.model.checkpoint is not None:
        return settings.model.checkpoint
    import shutil

    from model.demo import build_demo_model, default_demo_dir

    directory = default_demo_dir(settings.storage.data_dir)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / ".demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder when several workers start together
        if not (directory / "model.json").exists():
            message = (f"no [model] checkpoint configured: using the synthetic demo model, built once in {directory} "
                       "(about a minute on CPU)")
            if progress:
                print(message, flush=True)
            else:
                log.info(message)
            building = directory.parent / f".{directory.name}.building"
            shutil.rmtree(building, ignore_errors=True)
            build_demo_model(building, progress=progress, report=None if progress else log.info)
            shutil.rmtree(directory, ignore_errors=True)
            building.rename(directory)
    return directory


def _without_pixels(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A header view (shares element objects): the SR copies evidence attributes, never pixels."""
    header = pydicom.Dataset()
    for element in ds:
        if element.tag != PIXEL_DATA:
            header.add(element)
    header.file_meta = ds.file_meta
    return header


class Worker:
    def __init__(self, settings: Settings, queue: JobQueue) -> None:
        self.settings = settings
        self.queue = queue
        self.spool_root = settings.storage.spool_dir
        self.reports = Spool(settings.storage.data_dir / "sr")
        self.images = Spool(settings.storage.data_dir / "images")
        self.outbox = Spool(settings.storage.data_dir / "outbox")
        self._predictor = None

    @property
    def predictor(self):  # noqa: ANN201
        if self._predictor is None:
            from model.predict import Predictor

            self._predictor = Predictor(model_directory(self.settings), device=self.settings.model.device)
            log.info("model %s loaded on %s%s", self._predictor.info.model_id, self._predictor.device,
                     " (SYNTHETIC demo model)" if self._predictor.info.synthetic else "")
        return self._predictor

    def run_once(self) -> bool:
        """Claim and process one job; False when none is due."""
        job = self.queue.claim()
        if job is None:
            return False
        with log_context(job=job.job_id, series=job.series_instance_uid):
            try:
                self.process(job)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}" if not str(exc).startswith(type(exc).__name__) else str(exc)
                state = self.queue.fail(job.job_id, reason[:500], self.settings.worker.max_attempts,
                                        self.settings.worker.retry_seconds)
                log.error("job attempt %d failed (%s): %s", job.attempts, state, reason)
        return True

    def process(self, job: ClaimedJob) -> None:
        from model.volume import assemble_volume
        from node.identity import result_identity, source_digest
        from node.report import build_sr, centre_image
        from node.result_image import build_result_image

        timings: dict[str, float] = {}

        @contextlib.contextmanager
        def stage(name: str) -> Iterator[None]:
            started = time.perf_counter()
            yield
            timings[name] = round((time.perf_counter() - started) * 1000, 1)

        with stage("load"):
            datasets = [pydicom.dcmread(self.spool_root / p) for p in job.instance_paths]
        with stage("assemble"):
            volume = assemble_volume(datasets)
        predictor = self.predictor
        with stage("preprocess"):
            tensor = predictor.preprocess(volume)
        with stage("inference"):
            prediction = predictor.predict_tensor(tensor)
        with stage("report"):
            identity = result_identity(
                job.series_instance_uid,
                source_digest((str(ds.SOPInstanceUID), ds.get("PixelData") or b"") for ds in datasets),
                predictor.info.sha256,
                prediction.cutoff,
            )
            headers = [_without_pixels(ds) for ds in datasets]
            predecessor = self.queue.last_acknowledged(job.series_instance_uid, "sr", identity.sr_sop_instance_uid)
            centre, frame = centre_image(datasets)
            pixels = centre.pixel_array if frame is None else centre.pixel_array[frame - 1]
            sr = build_sr(headers, prediction, predictor.info, identity=identity, predecessor=predecessor,
                          centre_pixels=pixels)
            image = build_result_image(
                pixels, _without_pixels(centre), prediction, predictor.info,
                series_instance_uid=identity.image_series_instance_uid,
                sop_instance_uid=identity.image_sop_instance_uid, referenced_frame_number=frame,
            )
            encoded = {}
            for kind, ds in (("sr", sr), ("image", image)):
                buffer = io.BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                encoded[kind] = (ds, buffer.getvalue())
        with stage("write"):
            destinations = [d.name for d in self.settings.destinations]
            objects = []
            for kind, spool in (("sr", self.reports), ("image", self.images)):
                ds, data = encoded[kind]
                key = SpoolKey(job.study_instance_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
                path = spool.write(key, (data,))
                if not destinations:
                    self.outbox.write(key, (data,))
                objects.append(ResultFile(
                    kind, str(ds.SOPClassUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(path),
                    identity.content_key,
                    predecessor.sop_instance_uid if predecessor and kind == "sr" else None))
        sr_path = objects[0].path
        current = self.queue.finish(
            job.job_id,
            {
                "probability": prediction.probability,
                "label": prediction.label,
                "model_id": prediction.model_id,
                "device": prediction.device,
                "synthetic": prediction.synthetic,
                "timings": timings,
                "sr_sop_instance_uid": identity.sr_sop_instance_uid,
                "sr_path": sr_path,
                "objects": objects,
            },
            destinations,
        )
        if not current:
            log.info("result not exported: a newer version of the series superseded this job")
            return
        log.info("%s p=%.3f with %s on %s; timings ms %s", prediction.label, prediction.probability,
                 prediction.model_id, prediction.device, timings)

    def run(self, stop: threading.Event) -> None:
        """Load the model first (torch import + weights take seconds), then poll for jobs."""
        _ = self.predictor
        while not stop.is_set():
            if not self.run_once():
                stop.wait(POLL_SECONDS)


def worker_main(config_path: str | None, overrides: dict) -> None:
    """Entry point of a worker process (multiprocessing, spawn)."""
    settings = load_settings(config_path, overrides)
    setup_logging(settings.node.log_level)
    # highdicom validates the SR it builds; pydicom's per-value regexes on top
    # cost ~3 s per 170-slice report. Every SR we emit is checked by dciodvfy in the tests.
    disable_pydicom_validation()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    engine = make_engine(settings.storage.resolved_database_url)
    try:
        Worker(settings, JobQueue(engine)).run(stop)
    finally:
        engine.dispose()
