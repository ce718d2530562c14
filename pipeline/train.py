"""The `train` stage: a Ray Train V2 TorchTrainer whose workers run ``fssd.engine``.

Driver (``run_training``): resolves the job, joins the cluster at ``RAY_ADDRESS`` or starts a
local Ray, fits, copies the best checkpoint to ``models/``, writes ``metrics/train.json``.
Workers (``train_loop_per_worker``): build data, model, optimizer; resume from
``ray.train.get_checkpoint()``; train; report metrics and a checkpoint every epoch.
MLflow is written by the Ray Train controller only (:class:`MlflowEpochLogger`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fssd.checkpoint import load_checkpoint, save_checkpoint
from fssd.config import DetectorConfig, from_dict
from fssd.models.presets import build_detector

from .params import AugmentParams, Params, TrainParams, flatten
from . import tracking
from .io import atomic_write_json
# The job is resolved without torch (pipeline.job); these names stay importable from here.
from .job import (TrainJob, count_images, make_job, read_categories, read_source_ids,  # noqa: F401
                  resolve_model_init, resolve_pretrained)

__all__ = ["TrainJob", "make_job", "run_training", "train_loop_per_worker", "MlflowEpochLogger"]

CHECKPOINT_FILE = "checkpoint.pt"

# Worker messages go through Ray Train's logger, which reaches the driver's console once.
log = logging.getLogger("ray.train.fssd")


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------


def augmentation(aug: AugmentParams, input_size: int, mean: tuple[float, float, float],
                 std: tuple[float, float, float]) -> Any:
    """The training transform that ``train.augment`` describes (fssd.data.transforms.train_transform)."""
    from fssd.data.transforms import SSD_CROP_MODES, train_transform

    return train_transform(input_size, mean, std, photometric=aug.photometric, expand_max_ratio=aug.zoom_out,
                           p_expand=aug.p_zoom_out, crop_modes=SSD_CROP_MODES if aug.crop else (None,),
                           p_flip=aug.flip)


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), *np_state[2:]],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npst = state["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype("uint32"), *npst[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _load_pretrained(model: torch.nn.Module, uri: str, sha256: str | None, endpoint_url: str | None) -> None:
    """ImageNet VGG16 (torchvision layout) from a local path or s3:// (verified by ``sha256``)
    into the backbone."""
    from fssd.weights import load_state_dict_file, vgg16_backbone_from_torchvision

    path = uri
    tmp = None
    if uri.startswith("s3://"):
        from .download import Source, fetch

        tmp = tempfile.mkdtemp(prefix="fssd-weights-")
        path = str(fetch(Source(url=uri, sha256=sha256, md5=None, extract=False), Path(tmp), s3_endpoint_url=endpoint_url))
    try:
        state = vgg16_backbone_from_torchvision(load_state_dict_file(path))
        model.backbone.load_state_dict(state, strict=False)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point (one per DDP rank)."""
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader

    from fssd.data.collate import detection_collate
    from fssd.data.dataset import DetectionDataset
    from fssd.data.sampler import GlobalBatchSampler
    from fssd.data.transforms import eval_transform
    from fssd.engine import LRSchedule, TrainState, make_ema, param_groups, predict, gather_detections, train_one_epoch
    from fssd.evaluation import voc_map
    from fssd.loss import MultiBoxLoss

    job = TrainJob.from_dict(config)
    tp = from_dict(TrainParams, job.train, "train")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "0")) or (os.cpu_count() or 1) // max(1, ctx.get_local_world_size())))
    if rank == 0:
        log.info(f"[fssd] worker on {device}" + ("" if cuda else f", {torch.get_num_threads()} torch threads")
                 + f", OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    torch.manual_seed(job.seed + rank)
    cfg = DetectorConfig.from_dict(job.detector)
    m = cfg.model

    train_ds = DetectionDataset(Path(job.train_json), Path(job.data_root),
                                augmentation(tp.augment, m.input_size, m.image_mean, m.image_std),
                                ignored=tp.difficult, seed=job.seed)
    val_ds = DetectionDataset(Path(job.val_json), Path(job.data_root),
                              eval_transform(m.input_size, m.image_mean, m.image_std), ignored="target")
    train_set = train_ds
    if tp.max_images is not None and tp.max_images < len(train_ds):
        train_set = torch.utils.data.Subset(train_ds, range(tp.max_images))
    sampler = GlobalBatchSampler(len(train_set), tp.batch_size, rank=rank, world_size=world, seed=job.seed)
    loader_kw = dict(num_workers=tp.loader_workers, collate_fn=detection_collate, pin_memory=cuda,
                     persistent_workers=tp.loader_workers > 0)
    train_loader = DataLoader(train_set, batch_sampler=sampler, **loader_kw)
    val_sampler = GlobalBatchSampler(len(val_ds), tp.batch_size, rank=rank, world_size=world, shuffle=False, drop_last=False)
    val_loader = DataLoader(val_ds, batch_sampler=val_sampler, **{**loader_kw, "persistent_workers": False})

    model = build_detector(cfg)
    if job.model_init and not job.init_checkpoint:  # fine-tuning a trained detector (model.init)
        from fssd.weights import transfer_detector

        source = load_checkpoint(job.model_init)
        report = transfer_detector(source["model"], source["class_names"], model, job.class_names, job.init_classes)
        if rank == 0:
            log.info(f"[fssd] initialised from {job.model_init}: {report.describe()}")
    elif job.pretrained and not job.init_checkpoint:
        _load_pretrained(model, job.pretrained, job.pretrained_sha256, job.s3_endpoint_url)
    if tp.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    channels_last = tp.channels_last  # faster on CUDA and on CPU (oneDNN): bench/bench_model.py
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if world > 1 else model

    optimizer = torch.optim.SGD(param_groups(model, tp.weight_decay), lr=tp.scaled_lr, momentum=tp.momentum)
    steps = len(sampler)
    schedule = LRSchedule(
        job.epochs * steps, warmup_iters=round(tp.warmup_epochs * steps), warmup_factor=tp.warmup_factor,
        schedule=tp.schedule, milestones=[e * steps for e in tp.milestones], gamma=tp.gamma,
    )
    scheduler = schedule.scheduler(optimizer)
    amp_dtype = getattr(torch, tp.amp_dtype) if (tp.amp and cuda) else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    ema = make_ema(model, tp.ema_decay) if tp.ema else None
    criterion = MultiBoxLoss(model.priors, iou_threshold=cfg.loss.iou_threshold, neg_pos_ratio=cfg.loss.neg_pos_ratio,
                             variances=cfg.priors.variances, loc_weight=cfg.loss.loc_weight, distributed=True)
    state = TrainState()
    start_epoch = 0
    best_map = -1.0
    last_map = float("nan")

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            payload = load_checkpoint(Path(d) / CHECKPOINT_FILE, map_location=device)
        tr = payload["training"]
        model.load_state_dict(tr.get("model") or payload["model"])  # raw weights when EMA is on
        optimizer.load_state_dict(tr["optimizer"])
        scheduler.load_state_dict(tr["scheduler"])
        if scaler is not None and tr.get("scaler"):
            scaler.load_state_dict(tr["scaler"])
        if ema is not None and tr.get("ema"):
            ema.load_state_dict(tr["ema"])
        state = TrainState(**tr["state"])
        start_epoch = tr["epoch"] + 1
        best_map, last_map = tr.get("best_map", -1.0), tr.get("last_map", float("nan"))
        rng = tr["rng"][rank] if rank < len(tr["rng"]) else tr["rng"][0]
        _set_rng_state(rng)
        if rank == 0:
            log.info(f"[fssd] resumed {job.run_name} from epoch {tr['epoch'] + 2}/{job.epochs}")
    elif job.init_checkpoint:
        payload = load_checkpoint(job.init_checkpoint, map_location=device)
        model.load_state_dict(payload["model"])
        if rank == 0:
            log.info(f"[fssd] initialised from {job.init_checkpoint}")

    progress = None
    if job.progress and rank == 0:
        from ray.experimental.tqdm_ray import tqdm

        progress = tqdm
    for epoch in range(start_epoch, job.epochs):
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        bar = progress(total=steps, desc=f"epoch {epoch + 1}/{job.epochs}") if progress else None

        def on_step(i: int, stats: Any) -> None:
            if bar is not None:
                bar.update(1)
            elif rank == 0 and (i + 1) % tp.log_every == 0 and i + 1 < steps:
                log.info(f"[fssd] epoch {epoch + 1}/{job.epochs} step {i + 1}/{steps} lr {stats.lr:.5f} "
                         f"{stats.images_per_second * world:.1f} img/s")
            if job.test_kill_at_epoch == epoch and i == 1 and rank == world - 1 and job.test_kill_marker:
                marker = Path(job.test_kill_marker)
                if not marker.exists():
                    marker.write_text(str(os.getpid()))
                    os.kill(os.getpid(), signal.SIGKILL)

        stats = train_one_epoch(
            ddp, train_loader, criterion, optimizer, scheduler, state, device=device, amp_dtype=amp_dtype,
            scaler=scaler, grad_clip=tp.grad_clip, ema=ema, channels_last=channels_last,
            max_bad_steps=tp.max_bad_steps, on_step=on_step, freeze_bn=tp.freeze_bn,
        )
        if bar is not None:
            bar.close()
        validated = len(val_ds) > 0 and ((epoch + 1) % tp.val_every == 0 or epoch + 1 == job.epochs)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": stats.loss,
            "loss_loc": stats.loss_loc,
            "loss_conf": stats.loss_conf,
            "lr": stats.lr,
            "images_per_second": stats.images_per_second * world,
            "epoch_seconds": stats.seconds,
            "bad_steps": state.bad_steps,
        }
        if validated:
            eval_model = ema.module if ema is not None else model
            dets = gather_detections(predict(eval_model, val_loader, device=device, amp_dtype=amp_dtype,
                                             channels_last=channels_last, category_ids=job.category_ids))
            last_map = float(voc_map(job.val_json, dets, iou_threshold=0.5, use_07_metric=True).map) if dets else 0.0
            best_map = max(best_map, last_map)
            metrics["val_map"] = last_map
        # the checkpoint kept: the best validation mAP, or the latest with train.select: last
        metrics["score"] = float(epoch + 1) if tp.select == "last" else (last_map if validated else -1.0)
        if rank == 0:
            line = (f"[fssd] epoch {epoch + 1}/{job.epochs} loss {stats.loss:.4f} (loc {stats.loss_loc:.4f} "
                    f"conf {stats.loss_conf:.4f}) lr {stats.lr:.5f} {metrics['images_per_second']:.1f} img/s")
            if validated:
                line += f" val mAP@0.5 {last_map:.4f}"
            if stats.bad_steps:
                line += f" skipped {stats.bad_steps} non-finite steps"
            log.info(line)
        rngs = [None] * world
        if world > 1:
            torch.distributed.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                training = {
                    "epoch": epoch,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "ema": ema.state_dict() if ema is not None else None,
                    "state": dataclasses.asdict(state),
                    "rng": rngs,
                    "best_map": best_map,
                    "last_map": last_map,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()} if ema is not None else None,
                }
                weights = ema.module if ema is not None else model
                save_checkpoint(Path(tmp) / CHECKPOINT_FILE, weights, cfg, job.class_names,
                                training=training, meta={"run_name": job.run_name, "metrics": metrics,
                                                         "category_ids": job.source_ids})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_epoch{epoch + 1:04d}")


# --------------------------------------------------------------------------------------------
# Controller side: MLflow, written by one process
# --------------------------------------------------------------------------------------------


def _user_callback_base() -> type:
    from ray.train import UserCallback

    return UserCallback


class MlflowEpochLogger(_user_callback_base()):  # type: ignore[misc]
    """Logs rank 0's metrics of every report to one MLflow run, from the Ray Train controller.

    ``after_report`` runs once per persisted report, so a worker restart (which resumes from
    the last persisted checkpoint) never logs an epoch twice.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        m = dict(metrics[0])
        epoch = int(m.pop("epoch"))
        m.pop("score", None)
        values = {k: v for k, v in m.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        tracking.log_metrics(self.tracking_uri, self.run_id, values, step=epoch)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster at RAY_ADDRESS (as under `ray job submit`), else start a local Ray.

    A local Ray gets its dashboard on 127.0.0.1 at a free port, and every actor is told that
    address (``RAY_API_SERVER_ADDRESS``): Ray Train's placement-group cleaner finds the State API
    by it. Without it, with several Ray instances on one machine, the cleaner gives up and the
    placement group of a stopped run (a trial ASHA stopped) keeps its CPUs.
    """
    import socket

    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=num_cpus or os.cpu_count() or 1, dashboard_host="127.0.0.1", dashboard_port=port,
             log_to_driver=True, runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})


def storage(storage_path: str, endpoint_url: str | None) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: local paths made absolute; s3:// with an
    endpoint override (MinIO, Ceph, moto) gets a pyarrow S3FileSystem pointed at it."""
    if storage_path.startswith("s3://"):
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        if not endpoint:
            return storage_path, None
        import pyarrow.fs

        scheme = "https" if endpoint.startswith("https") else "http"
        host = endpoint.split("://", 1)[-1].rstrip("/")
        fs = pyarrow.fs.S3FileSystem(endpoint_override=host, scheme=scheme,
                                     region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        return storage_path[len("s3://"):], fs
    return str(Path(storage_path).resolve()), None


def scaling_config(tp: TrainParams, num_workers: int | None = None, cpus_per_worker: float | None = None):
    import ray
    from ray.train import ScalingConfig

    workers = num_workers or tp.num_workers
    cpus = cpus_per_worker or tp.cpus_per_worker
    if cpus is None:
        total = ray.cluster_resources().get("CPU", os.cpu_count() or 1) if ray.is_initialized() else (os.cpu_count() or 1)
        cpus = 4.0 if tp.use_gpu else max(1.0, math.floor(total / workers))
    resources = {"CPU": float(cpus)}
    if tp.use_gpu:
        resources["GPU"] = 1.0
    return ScalingConfig(num_workers=workers, use_gpu=tp.use_gpu, resources_per_worker=resources)


def fit(job: TrainJob, tp: TrainParams, *, storage_path: str, endpoint_url: str | None = None,
        callbacks: list[Any] | None = None, num_workers: int | None = None):
    """Run one TorchTrainer fit for ``job``; returns the Ray Train Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    path, fs = storage(storage_path, endpoint_url)
    run_config = RunConfig(
        name=job.run_name,
        storage_path=path,
        storage_filesystem=fs,
        checkpoint_config=CheckpointConfig(num_to_keep=tp.keep_checkpoints, checkpoint_score_attribute="score",
                                           checkpoint_score_order="max"),
        failure_config=FailureConfig(max_failures=tp.max_failures),
        callbacks=callbacks or [],
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.to_dict(),
        scaling_config=scaling_config(tp, num_workers),
        run_config=run_config,
    )
    return trainer.fit()


def best_checkpoint(result: Any, select: str = "best") -> Any:
    """The reported checkpoint with the highest fresh validation mAP (the latest if none, or
    with ``select="last"``)."""
    if select == "last":
        return result.checkpoint
    best = [(m.get("score", -1.0), m.get("epoch", 0), c) for c, m in (result.best_checkpoints or [])]
    best = [b for b in best if b[0] is not None and b[0] >= 0 and not math.isnan(b[0])]
    if best:
        return max(best, key=lambda b: (b[0], b[1]))[2]
    return result.checkpoint


def run_training(
    params: Params,
    *,
    model_out: Path = Path("models/fssd.pt"),
    metrics_out: Path = Path("metrics/train.json"),
    job: TrainJob | None = None,
) -> dict[str, Any]:
    """The `train` stage. Returns the metrics written to ``metrics_out``."""
    started = time.time()
    job = job or make_job(params)
    tp = params.train
    init_ray()
    uri = tracking.resolve_tracking_uri(params.mlflow.tracking_uri)
    processed = Path(params.data.root) / "processed"
    run_id, resumed = tracking.find_or_create_run(
        uri, params.mlflow.experiment, key=job.run_name, run_name=job.run_name,
        tags={"fssd.stage": "train", **tracking.provenance_tags(processed)},
    )
    tracking.log_params(uri, run_id, {**flatten(params.to_dict()), "run_name": job.run_name,
                                      "train.scaled_lr": tp.scaled_lr})
    print(f"[fssd] training {job.run_name} ({'resuming' if resumed else 'new'} MLflow run {run_id}); "
          f"{tp.num_workers} worker(s), global batch {tp.batch_size}, lr {tp.scaled_lr:g}", flush=True)
    try:
        result = fit(job, tp, storage_path=tp.storage_path, endpoint_url=params.data.s3.endpoint_url,
                     callbacks=[MlflowEpochLogger(uri, run_id)])
    except BaseException:
        tracking.client(uri).set_terminated(run_id, status="FAILED")
        raise
    ckpt = best_checkpoint(result, tp.select)
    if ckpt is None:
        tracking.client(uri).set_terminated(run_id, status="FAILED")
        raise RuntimeError(f"training run {job.run_name} reported no checkpoint")
    model_out = Path(model_out)
    model_out.parent.mkdir(parents=True, exist_ok=True)
    with ckpt.as_directory() as d:
        tmp = model_out.with_name(f".{model_out.name}.{os.getpid()}.tmp")
        shutil.copyfile(Path(d) / CHECKPOINT_FILE, tmp)
        os.replace(tmp, model_out)
    payload = load_checkpoint(model_out)
    final = dict(result.metrics or {})
    best_metrics = payload["meta"].get("metrics", {})
    metrics = {
        "run_name": job.run_name,
        "mlflow_run_id": run_id,
        "epochs": int(final.get("epoch", 0)),
        "best_epoch": int(best_metrics.get("epoch", 0)),
        "val_map": best_metrics.get("val_map"),
        "final_loss": final.get("loss"),
        "images_per_second": final.get("images_per_second"),
        "bad_steps": final.get("bad_steps", 0),
        "seconds": round(time.time() - started, 1),
        "checkpoint": str(model_out),
    }
    atomic_write_json(Path(metrics_out), metrics)
    c = tracking.client(uri)
    c.log_artifact(run_id, str(model_out), artifact_path="checkpoint")
    if metrics["val_map"] is not None:
        c.log_metric(run_id, "best_val_map", float(metrics["val_map"]))
    c.set_tag(run_id, "fssd.checkpoint", str(model_out.resolve()))
    c.set_terminated(run_id, status="FINISHED")
    return metrics
