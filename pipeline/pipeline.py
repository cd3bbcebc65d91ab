"""The KFP v2 pipeline: ingest -> split -> pretrain -> parallel tuning -> select best -> train -> evaluate
-> publish.

::

    ParallelFor(ingest_shards): ingest_shard ─► merge_shards ─► split ─► pretrain ◄─ ingest_extra
                         │
                         ├─► ParallelFor(worker_ids(n_tune_workers)): tune_worker  ─┐  (one Optuna study)
                         │                                                          ▼
                         └────────────────────────────────────────► select_best ─► train_model
                                                                                     │
                 dsl.If(test accuracy >= majority baseline + accuracy_margin) ◄─ evaluate_model
                                                 └─► challenge_model ─► dsl.If(promote) ─► publish_model

``pretrain`` trains a backbone on the training split plus ``ingest_extra``'s images (the counts the
task leaves out: empty bins, 6+ items) for ``pretrain_epochs``; every tuning trial and the final fit
start from it, so the tuned parameters are tuned for the fit's starting point. With
``pretrain_per_class`` 0 ``ingest_extra`` writes an empty manifest and reads nothing; with
``pretrain_epochs`` 0 ``pretrain`` writes only a note and everything starts from ``weights``.

``evaluate_model`` scores the model on the test split and the majority-class baseline (always answering
the training split's most frequent count) on the same images; it returns the accuracy and whether it
reaches that baseline plus ``accuracy_margin``, which the first ``dsl.If`` tests (a KFP condition can only
compare an output with a constant or a parameter).

``challenge_model`` scores the new model and the store's latest published version of ``model_name`` on
the same test images (:mod:`components.champion`): the new one is published only when its paired
accuracy gain reaches ``champion_min_gain`` (``champion_gate`` interval, the default: the lower end of
its 95 % interval; point: the gain itself, on at least 200 test images and with an RMSE no worse; off: no
comparison). With nothing published yet it always is.

The graph is the same locally and on a cluster. What differs is decided at build time
(:func:`build_pipeline`): the image, GPU requests for pretrain/tune/train, and the Kubernetes Secrets
(Optuna's database URL, S3 credentials) attached with ``kfp-kubernetes``, and ingest's retries. ``kfp.local``
ignores resources and Kubernetes settings (it honours retries, so ``run_local`` turns them off), so one
definition serves both. (No ``from __future__ import annotations``: KFP
reads the pipeline signature's annotations at runtime.)
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kfp import dsl, kubernetes

from components import __version__
from pipeline.components import DEFAULT_COMPONENTS_IMAGE, make_components
from pipeline.profiles import PARAMETER_HELP, pipeline_docstring

PIPELINE_NAME = "inventory-monitor"
PIPELINE_DESCRIPTION = (
    "Train and publish the ABID bin item counter: ingest, split, parallel Optuna tuning, final fit, "
    "ONNX evaluation on the test split, and a gated publish in the KServe storage layout."
)
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class BuildOptions:
    """Compile-time settings: KFP fixes these in the pipeline spec, so they are not run parameters."""

    image: str = DEFAULT_COMPONENTS_IMAGE
    gpu: bool = False
    tune_parallelism: int = 2
    #: ingest shards fetched at once (the shard count itself is the run parameter ingest_shards)
    ingest_parallelism: int = 8
    #: the final fit as a Kubeflow Trainer TrainJob (the shared volume is mounted at compile time, and
    #: kfp.local cannot create one), sized by the trainjob_* run parameters
    trainjob: bool = False
    optuna_secret: str | None = "optuna-db"
    optuna_secret_key: str = "url"
    s3_secret: str | None = "aws-credentials"
    image_pull_policy: str = "IfNotPresent"
    #: retries of ingest (S3 hiccups on a cluster); kfp.local honours them too, so run_local sets 0
    ingest_retries: int = 3


def _k8s(task: Any, opts: BuildOptions) -> Any:
    if opts.image_pull_policy:
        kubernetes.set_image_pull_policy(task, opts.image_pull_policy)
    return task


def _with_s3_credentials(task: Any, opts: BuildOptions) -> Any:
    """Optional Secret: the public bucket needs none, a private bucket or the model store does."""
    if opts.s3_secret:
        kubernetes.use_secret_as_env(
            task,
            secret_name=opts.s3_secret,
            secret_key_to_env={
                "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
            },
            optional=True,
        )
    return task


def _with_optuna_storage(task: Any, opts: BuildOptions) -> Any:
    if opts.optuna_secret:
        kubernetes.use_secret_as_env(
            task, secret_name=opts.optuna_secret, secret_key_to_env={opts.optuna_secret_key: "OPTUNA_STORAGE"}
        )
    return task


def _fetching(task: Any, opts: BuildOptions) -> Any:
    """An ingest task: retried with backoff (S3 hiccups), cached, S3 credentials if the Secret exists."""
    if opts.ingest_retries:
        task.set_retry(
            num_retries=opts.ingest_retries,
            backoff_duration="15s",
            backoff_factor=2.0,
            backoff_max_duration="300s",
        )
    task.set_cpu_request("1").set_cpu_limit("2").set_memory_request("1G").set_memory_limit("4G")
    task.set_caching_options(True)
    return _with_s3_credentials(_k8s(task, opts), opts)


def _trainer_resources(task: Any, opts: BuildOptions) -> Any:
    if opts.gpu:
        task.set_cpu_request("4").set_cpu_limit("8").set_memory_request("16G").set_memory_limit("32G")
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
        kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    else:
        task.set_cpu_request("2").set_cpu_limit("4").set_memory_request("4G").set_memory_limit("8G")
    return task


def _on_trainjob(task: Any) -> Any:
    """The task that creates and awaits the TrainJob: the shared volume the job's pods also mount, its
    namespace (where it creates the job), and CPU for the int8 step that still runs here."""
    from components.trainjob import MOUNT_PATH, PVC_NAME

    kubernetes.mount_pvc(task, pvc_name=PVC_NAME, mount_path=str(MOUNT_PATH))
    kubernetes.use_field_path_as_env(task, env_name="POD_NAMESPACE", field_path="metadata.namespace")
    task.set_cpu_request("1").set_cpu_limit("2").set_memory_request("2G").set_memory_limit("4G")
    return task


def _documented(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give the pipeline function the docstring KFP turns into its input descriptions (the KFP UI's run
    form), from :data:`pipeline.profiles.PARAMETER_HELP`; a parameter without help fails here."""
    import inspect

    names = list(inspect.signature(func).parameters)
    if set(names) != set(PARAMETER_HELP):
        raise RuntimeError(
            f"pipeline parameters and PARAMETER_HELP differ: only in the signature "
            f"{sorted(set(names) - set(PARAMETER_HELP))}, only in PARAMETER_HELP "
            f"{sorted(set(PARAMETER_HELP) - set(names))}"
        )
    func.__doc__ = pipeline_docstring(PIPELINE_DESCRIPTION)
    return func


def build_pipeline(opts: BuildOptions | None = None) -> Callable[..., Any]:
    """The ``@dsl.pipeline`` function for ``opts``; its parameters are documented in pipeline.profiles."""
    opts = opts or BuildOptions()
    c = make_components(opts.image)

    @dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)
    @_documented
    def inventory_pipeline(
        source: str = "s3://aft-vbi-pds",
        endpoint_url: str = "",
        per_class: int = 15,
        ingest_shards: int = 1,
        classes: str = "1,2,3,4,5",
        split_ratios: str = "0.7,0.15,0.15",
        seed: int = 0,
        head: str = "ordinal",
        weights: str = "none",
        image_size: int = 40,
        batch_size: int = 16,
        epochs: int = 2,
        ema: float = 0.0,
        tta: bool = False,
        pretrain_per_class: int = 0,
        pretrain_classes: str = "0,6,7,8,9,10",
        pretrain_epochs: int = 0,
        tune_trials: int = 3,
        tune_epochs: int = 1,
        n_tune_workers: int = 2,
        optuna_storage: str = "",
        device: str = "cpu",
        num_threads: int = 1,
        accuracy_margin: float = 0.0,
        champion_gate: str = "interval",
        champion_min_gain: float = 0.0,
        model_store: str = "",
        model_name: str = "inventory-counter",
        int8: bool = True,
        trainjob_nodes: int = 1,
        trainjob_gpus_per_node: int = 0,
        trainjob_cpu: str = "4",
        trainjob_memory: str = "16Gi",
        trainjob_timeout_s: int = 86400,
        trainjob_keep: str = "failed",
        model_version: str = "",
        serving_image: str = f"inventory-monitor/serving:{__version__}",
    ) -> None:
        shard_ids = c.shard_ids(n=ingest_shards)
        shard_ids.set_display_name("ingest shards").set_cpu_limit("500m").set_memory_limit("256M")
        shard_ids.set_caching_options(True)
        _k8s(shard_ids, opts)
        with dsl.ParallelFor(shard_ids.output, parallelism=opts.ingest_parallelism) as shard:
            ingest = c.ingest_shard(
                source=source,
                endpoint_url=endpoint_url,
                per_class=per_class,
                classes=classes,
                shard=shard,
                num_shards=ingest_shards,
            )
            _fetching(ingest.set_display_name("ingest ABID images (a shard)"), opts)
        merge = c.merge_shards(shards=dsl.Collected(ingest.outputs["dataset"]), source=source)
        merge.set_display_name("merge the ingest shards").set_caching_options(True)
        merge.set_cpu_limit("2").set_memory_limit("2G")
        _k8s(merge, opts)
        data = merge.outputs["dataset"]

        extra = c.ingest_extra(
            source=source, endpoint_url=endpoint_url, per_class=pretrain_per_class, classes=pretrain_classes
        )
        _fetching(extra.set_display_name("ingest other counts (pretraining)"), opts)

        split = c.split(dataset=data, ratios=split_ratios, seed=seed)
        split.set_display_name("stratified split")
        split.set_cpu_limit("1").set_memory_limit("1G").set_caching_options(True)
        _k8s(split, opts)
        train_csv, val_csv, test_csv = split.outputs["train"], split.outputs["val"], split.outputs["test"]

        pretrain = c.pretrain(
            dataset=data,
            train=train_csv,
            val=val_csv,
            test=test_csv,
            extra=extra.outputs["dataset"],
            classes=classes,
            pretrain_classes=pretrain_classes,
            pretrain_epochs=pretrain_epochs,
            weights=weights,
            image_size=image_size,
            batch_size=batch_size,
            ema=ema,
            seed=seed,
            device=device,
            num_threads=num_threads,
        )
        pretrain.set_display_name("pretrain on every count").set_caching_options(True)
        _trainer_resources(_k8s(pretrain, opts), opts)
        backbone = pretrain.outputs["backbone"]

        workers = c.worker_ids(n=n_tune_workers)
        workers.set_display_name("tuning workers").set_cpu_limit("500m").set_memory_limit("256M")
        workers.set_caching_options(True)
        _k8s(workers, opts)

        tuning = {
            "run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            "optuna_storage": optuna_storage,
            "n_trials": tune_trials,
            "dataset": data,
            "train": train_csv,
            "val": val_csv,
            "classes": classes,
            "head": head,
            "weights": weights,
            "backbone": backbone,
            "image_size": image_size,
            "batch_size": batch_size,
            "epochs": tune_epochs,
            "ema": ema,
            "seed": seed,
            "device": device,
            "num_threads": num_threads,
        }
        with dsl.ParallelFor(workers.output, parallelism=opts.tune_parallelism) as worker:
            tune = c.tune_worker(worker=worker, **tuning)
            tune.set_display_name("tune (Optuna worker)").set_caching_options(False)
            _with_optuna_storage(_trainer_resources(_k8s(tune, opts), opts), opts)

        best = c.select_best(trials_run=dsl.Collected(tune.outputs["Output"]), **tuning)
        best.set_display_name("best parameters").set_cpu_limit("1").set_memory_limit("1G")
        best.set_caching_options(False)
        _with_optuna_storage(_k8s(best, opts), opts)

        fit = {}
        if opts.trainjob:
            fit = {
                "run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                "image": opts.image,
                "trainjob_nodes": trainjob_nodes,
                "trainjob_gpus_per_node": trainjob_gpus_per_node,
                "trainjob_cpu": trainjob_cpu,
                "trainjob_memory": trainjob_memory,
                "trainjob_timeout_s": trainjob_timeout_s,
                "trainjob_keep": trainjob_keep,
            }
        train = (c.train_trainjob if opts.trainjob else c.train)(
            **fit,
            best_params=best.outputs["Output"],
            dataset=data,
            train=train_csv,
            val=val_csv,
            backbone=backbone,
            classes=classes,
            head=head,
            weights=weights,
            image_size=image_size,
            batch_size=batch_size,
            epochs=epochs,
            ema=ema,
            tta=tta,
            seed=seed,
            device=device,
            num_threads=num_threads,
            model_name=model_name,
            int8=int8,
        )
        train.set_display_name("train with the best parameters").set_caching_options(False)
        if opts.trainjob:
            _on_trainjob(_k8s(train, opts))
        else:
            _trainer_resources(_k8s(train, opts), opts)

        evaluate = c.evaluate(
            model=train.outputs["model"],
            dataset=data,
            train=train_csv,
            test=test_csv,
            accuracy_margin=accuracy_margin,
        )
        evaluate.set_display_name("evaluate on test (ONNX)")
        evaluate.set_cpu_limit("2").set_memory_limit("4G").set_caching_options(True)
        _k8s(evaluate, opts)

        # evaluate's Output: test accuracy >= majority baseline + accuracy_margin
        with dsl.If(evaluate.outputs["Output"] == True, name="accuracy-gate"):  # noqa: E712 - KFP condition
            challenge = c.challenge(
                model=evaluate.outputs["evaluated"],
                dataset=data,
                test=test_csv,
                model_store=model_store,
                endpoint_url=endpoint_url,
                model_name=model_name,
                champion_gate=champion_gate,
                champion_min_gain=champion_min_gain,
            )
            challenge.set_display_name("challenge the published model").set_caching_options(False)
            challenge.set_cpu_limit("2").set_memory_limit("4G")
            _with_s3_credentials(_k8s(challenge, opts), opts)
            with dsl.If(challenge.outputs["Output"] == True, name="champion-gate"):  # noqa: E712 - KFP condition
                publish = c.publish(
                    model=evaluate.outputs["evaluated"],
                    test_accuracy=evaluate.outputs["accuracy"],
                    model_store=model_store,
                    endpoint_url=endpoint_url,
                    model_name=model_name,
                    model_version=model_version,
                    serving_image=serving_image,
                )
                publish.set_display_name("publish to the model store").set_caching_options(False)
                publish.set_cpu_limit("1").set_memory_limit("1G")
                _with_s3_credentials(_k8s(publish, opts), opts)

    return inventory_pipeline
