"""Classification worker: its own process, started by `serve`.

Claims queued jobs atomically and runs volume -> preprocess -> predict ->
report for each, recording per-stage timings and the model id on the job. The
model is loaded once per worker process. When `[model] checkpoint` is not set
the synthetic demo model is used, built on first use.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import io
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom

from node.config import Settings, load_settings
from node.dimse_tuning import disable_pydicom_validation
from node.logs import log_context, setup_logging
from node.signals import stop_on_signals
from storage.db import make_engine
from storage.jobs import ClaimedJob, JobQueue, ResultFile
from storage.spool import Spool, SpoolKey, read_spooled

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
        stale = (directory / "model.json").exists() and not _demo_model_is_current(directory)
        if stale or not (directory / "model.json").exists():
            message = (f"no [model] checkpoint configured: using the synthetic demo model, built once in {directory} "
                       "(about a minute on CPU)")
            if stale:
                message += "; the one there was built for an older preprocessing and is rebuilt"
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


def _demo_model_is_current(directory: Path) -> bool:
    """A demo model built before head-centred preprocessing (its input spec names no centring)
    would be fed grids it was not trained on: it is rebuilt rather than used."""
    try:
        spec = json.loads((directory / "model.json").read_text()).get("input_spec", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(spec, dict) and spec.get("centring") == "head"


def _strip_pixels(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The dataset itself, its pixel data removed: the SR copies evidence attributes, never pixels.

    In place: the datasets were read for this one job and their pixels are used by then (volume,
    digest, the centre image). Copying every other element into a new header instead cost ~45 ms
    per 170 slices; elements still raw stay raw and are converted only where the SR reads them.
    """
    if PIXEL_DATA in ds:
        del ds[PIXEL_DATA]
    return ds


def _encode_results(datasets, prediction, info, identity, predecessor) -> dict:  # noqa: ANN001
    """{"sr" | "image": (dataset, Part 10 bytes)}: the SR and the result image of one prediction.
    Consumes the datasets' pixel data (_strip_pixels)."""
    from node.report import build_sr, centre_image
    from node.result_image import build_result_image

    centre, frame = centre_image(datasets)
    pixels = centre.pixel_array if frame is None else centre.pixel_array[frame - 1]
    headers = [_strip_pixels(ds) for ds in datasets]
    sr = build_sr(headers, prediction, info, identity=identity, predecessor=predecessor, centre_pixels=pixels)
    image = build_result_image(
        pixels, centre, prediction, info,
        series_instance_uid=identity.image_series_instance_uid,
        sop_instance_uid=identity.image_sop_instance_uid, referenced_frame_number=frame,
    )
    encoded = {}
    for kind, ds in (("sr", sr), ("image", image)):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        encoded[kind] = (ds, buffer.getvalue())
    return encoded


class Worker:
    def __init__(self, settings: Settings, queue: JobQueue, results_ready=None) -> None:  # noqa: ANN001
        """`results_ready` (a multiprocessing semaphore) is released when a result awaits export."""
        self.settings = settings
        self.queue = queue
        self.results_ready = results_ready
        self.spool_root = settings.storage.spool_dir
        self.reports = Spool(settings.storage.data_dir / "sr")
        self.images = Spool(settings.storage.data_dir / "images")
        self.outbox = Spool(settings.storage.data_dir / "outbox")
        self._predictor = None

    @property
    def predictor(self):  # noqa: ANN201
        if self._predictor is None:
            from model.predict import Predictor

            self._predictor = Predictor(model_directory(self.settings), device=self.settings.model.device,
                                        runtime=self.settings.model.runtime,
                                        cache_dir=self.settings.storage.data_dir / "cache")
            log.info("model %s loaded on %s (%s)%s", self._predictor.info.model_id, self._predictor.device,
                     self._predictor.runtime.name, " (SYNTHETIC demo model)" if self._predictor.info.synthetic else "")
        return self._predictor

    def run_once(self) -> bool:
        """Claim and process one job; False when none is due."""
        job = self.queue.claim()
        if job is None:
            return False
        with log_context(job=job.job_id, series=job.series_instance_uid), self._heartbeat(job.job_id), \
                collector_paused():
            try:
                self.process(job)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}" if not str(exc).startswith(type(exc).__name__) else str(exc)
                state = self.queue.fail(job.job_id, reason[:500], self.settings.worker.max_attempts,
                                        self.settings.worker.retry_seconds)
                log.error("job attempt %d failed (%s): %s", job.attempts, state, reason)
        return True

    @contextlib.contextmanager
    def _heartbeat(self, job_id: int) -> Iterator[None]:
        """Renew the job's lease every lease_seconds / 4 while it is processed, so that no node takes
        it back from a live worker; a worker or machine that is gone stops renewing it."""
        done = threading.Event()
        interval = self.queue.lease_seconds / 4

        def beat() -> None:
            while not done.wait(interval):
                try:
                    if not self.queue.heartbeat(job_id):
                        log.warning("lease on job %d lost (expired, or superseded); its result will not be "
                                    "recorded", job_id)
                        return
                except Exception:  # noqa: BLE001 - the database may be back at the next beat
                    log.warning("cannot renew the lease on job %d; retrying in %.0f s", job_id, interval,
                                exc_info=True)

        thread = threading.Thread(target=beat, name=f"lease-{job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def process(self, job: ClaimedJob) -> None:
        from model.volume import assemble_volume
        from node.identity import instance_content, result_identity, source_digest

        timings: dict[str, float] = {}

        @contextlib.contextmanager
        def stage(name: str) -> Iterator[None]:
            started = time.perf_counter()
            yield
            timings[name] = round((time.perf_counter() - started) * 1000, 1)

        with stage("load"):
            datasets = [read_spooled(self.spool_root / p) for p in job.instance_paths]
        with stage("assemble"):
            volume = assemble_volume(datasets)
        predictor = self.predictor
        with stage("preprocess"):
            tensor = predictor.preprocess(volume)
        with stage("inference"):
            prediction = predictor.predict_tensor(tensor)
        with stage("report"):
            reprs: dict = {}
            identity = result_identity(
                job.series_instance_uid,
                source_digest((str(ds.SOPInstanceUID), instance_content(ds, reprs)) for ds in datasets),
                predictor.info.sha256,
                prediction.cutoff,
            )
            predecessor = self.queue.last_acknowledged(job.series_instance_uid, "sr", identity.sr_sop_instance_uid)
            encoded = _encode_results(datasets, prediction, predictor.info, identity, predecessor)
        with stage("write"):
            destinations = [d.name for d in self.settings.destinations]
            objects = []
            for kind, spool in (("sr", self.reports), ("image", self.images)):
                ds, data = encoded[kind]
                key = SpoolKey(job.study_instance_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
                path = spool.write(key, (data,))
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
        if destinations and self.results_ready is not None:
            self.results_ready.release()  # serve's exporter sends it now rather than at its next tick
        if not destinations:  # only a current result goes to the outbox
            for ds, data in encoded.values():
                self.outbox.write(SpoolKey(job.study_instance_uid, str(ds.SeriesInstanceUID),
                                           str(ds.SOPInstanceUID)), (data,))
        log.info("%s p=%.3f with %s on %s; timings ms %s", prediction.label, prediction.probability,
                 prediction.model_id, prediction.device, timings)

    def warm_up(self) -> None:
        """A tiny synthetic series through volume, preprocessing, SR and result image, unsaved.

        First use costs more than the work: highdicom reads the standard's tables
        (~0.6 s on two cores) and Python's collector walks them as they load. Paid
        here, at start, rather than by the first series.
        """
        import tempfile

        from model.predict import Prediction
        from model.synth import write_series
        from model.volume import assemble_volume
        from node.identity import result_identity

        predictor = self.predictor
        info = predictor.info
        with tempfile.TemporaryDirectory(prefix="migraine-node-warm-up-") as tmp:
            series = write_series(Path(tmp), slices=4, rows=16, columns=16, spacing=4.0)
            datasets = [pydicom.dcmread(path) for path in series.paths]
        volume = assemble_volume(datasets)
        prediction = Prediction(probability=0.0, label=info.labels[0], cutoff=info.cutoff, model_id=info.model_id,
                                device=predictor.device.type, ms=0.0, synthetic=info.synthetic)
        identity = result_identity(series.series_instance_uid, "0" * 64, info.sha256, info.cutoff)
        _encode_results(datasets, prediction, info, identity, None)
        predictor.preprocess(volume)
        # Once at the input spec's full size: the heap grows to what a real series needs (kept, see
        # keep_freed_memory), so the first job does not pay for it.
        predictor.preprocess(_full_size_volume(info.input_spec))

    def start_up(self) -> None:
        """Load the model and warm up (seconds; a minute where the demo model is built first)."""
        started = time.perf_counter()
        _ = self.predictor
        try:
            self.warm_up()
        except Exception:  # noqa: BLE001  a failed warm-up costs the first job time, nothing else
            log.warning("warm-up failed; the first series pays its start-up costs", exc_info=True)
        # What start-up made (torch, the runtime, highdicom's tables: ~0.5 M objects) is never garbage, yet
        # every full collection walked it: ~0.3 s, at a random moment inside a job. Frozen, it is skipped.
        gc.collect()
        gc.freeze()
        log.info("worker ready in %.1f s", time.perf_counter() - started)

    def take_jobs(self, stop: threading.Event, work_ready=None, poll_seconds: float = POLL_SECONDS) -> None:  # noqa: ANN001
        """Take jobs until `stop`; a job under way is finished first.

        Between jobs the worker waits on `work_ready` (a multiprocessing semaphore
        serve releases once per job it queues), so a queued job starts at once;
        it looks for due jobs every `poll_seconds` anyway (retries, replays queued
        by another process).
        """
        while not stop.is_set():
            if not self.run_once():
                if work_ready is None:
                    stop.wait(poll_seconds)
                else:
                    work_ready.acquire(timeout=poll_seconds)


@contextlib.contextmanager
def exit_on_stop(stop: threading.Event) -> Iterator[None]:
    """A stop request during start-up ends the process at once.

    Start-up (imports, loading the model or building the demo model, the runtime's export and
    compile, warm-up) holds no job, and what it writes is written aside and renamed into place, so
    nothing is lost. Finishing it first could take longer than serve waits for a worker
    (WORKER_STOP_SECONDS: the demo model takes about a minute to build), and serve would kill it.
    """
    done = threading.Event()
    lock = threading.Lock()

    def watch() -> None:
        while not done.is_set():
            if stop.wait(0.1):
                with lock:  # never after the with block: then a job may be held
                    if not done.is_set():
                        log.info("stopped during start-up")
                        for handler in logging.getLogger().handlers:
                            handler.flush()
                        os._exit(0)

    watcher = threading.Thread(target=watch, name="start-up-stop", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        with lock:
            done.set()
        watcher.join()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a job runs, and one collection when it ends.

    A job makes ~10^5 container objects (170 headers, the SR's content tree). With the collector on,
    a first 170-slice job ran ~340 collections, ~0.1 s of its time to result. Reference counting
    still frees everything but cycles at once; the cycles one job leaves wait for its end.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
            gc.collect()


def _full_size_volume(spec):  # noqa: ANN001, ANN202  model.preprocess.InputSpec -> model.volume.Volume
    """A block "head" in a volume of the spec's own shape and spacing (warm-up only)."""
    import numpy as np

    from model.volume import Volume

    array = np.zeros(tuple(int(n) for n in spec.shape), dtype=np.float32)
    array[tuple(slice(n // 4, 3 * n // 4) for n in array.shape)] = 100.0
    affine = np.diag([*(float(s) for s in spec.spacing), 1.0])
    return Volume(array=array, affine=affine, spacing=tuple(float(s) for s in spec.spacing),
                  study_instance_uid=None, series_instance_uid=None, sop_instance_uids=())


# glibc mallopt parameters (<malloc.h>)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Serve this process's large arrays from its heap and keep freed memory there.

    A volume, its resampled grid and the input tensor are ~45 MB each at the paper's size, above
    glibc's largest mmap threshold (32 MB): each was a fresh mmap, page-faulted in and given back
    for every series (~100 ms of a 0.2 s preprocessing). From the heap, freed memory is reused by
    the next series; the worker's resident size stays at its peak instead of dropping between jobs
    (bench/load.py measures that it stays flat). False where mallopt is not glibc's.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL_SECONDS = 1.0


def _die_with_parent(stop: threading.Event) -> bool:
    """Make this worker end when `serve` ends, even when `serve` is SIGKILLed.

    Linux delivers SIGTERM to us when the parent dies (PR_SET_PDEATHSIG; the
    SIGTERM handler lets the current job finish). A parent that died before
    that call is caught by comparing the parent PID with the one we were
    started by, and a thread polling os.getppid() covers other platforms.
    False when the parent is already gone.
    """
    parent = multiprocessing.parent_process()
    expected = parent.pid if parent is not None else os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            log.warning("prctl(PR_SET_PDEATHSIG) unavailable; watching the parent PID only")
    if os.getppid() != expected:
        return False

    def watch() -> None:
        while not stop.wait(PARENT_POLL_SECONDS):
            if os.getppid() != expected:
                log.warning("serve (pid %d) is gone; this worker stops after its current job", expected)
                stop.set()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    return True


def worker_main(config_path: str | None, overrides: dict, work_ready=None, results_ready=None) -> None:  # noqa: ANN001
    """Entry point of a worker process (multiprocessing, spawn).

    `work_ready` and `results_ready` are serve's semaphores: serve releases the
    first for each job it queues, the worker the second for each result to export.
    Semaphores, not events: a worker killed while waiting cannot block whoever
    signals next (multiprocessing.Event.set waits for every sleeper to wake).
    """
    stop = threading.Event()
    stop_on_signals(stop, [signal.SIGTERM])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    if not _die_with_parent(stop):
        return  # serve died while we started: nobody would stop or supervise us
    settings = load_settings(config_path, overrides)
    setup_logging(settings.node.log_level)
    # highdicom validates the SR it builds; pydicom's per-value regexes on top
    # cost ~3 s per 170-slice report. Every SR we emit is checked by dciodvfy in the tests.
    disable_pydicom_validation()
    keep_freed_memory()
    engine = make_engine(settings.storage.resolved_database_url)
    # Claims carry "host:pid" (process_identity), so serve can release the job we hold if this
    # process dies, and any node can take it back if our lease runs out.
    queue = JobQueue(engine, lease_seconds=settings.worker.lease_seconds)
    try:
        worker = Worker(settings, queue, results_ready)
        with exit_on_stop(stop):  # this process is the worker's own: it may end itself
            worker.start_up()
        worker.take_jobs(stop, work_ready)
    finally:
        engine.dispose()
