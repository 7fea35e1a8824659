"""Host input pipelines: tfds splits -> per-process NumPy batches for the trainer and the evaluator.

``train_batches``: infinite, shuffled, augmented (``transforms.train_transform_encoded``), ``drop_remainder``.
``eval_batches``: one pass, centre-cropped (``transforms.val_transform``), last batch padded with
``valid=False`` examples. Each process reads ``tfds.even_splits(split, jax.process_count())[jax.process_index()]``;
``batch_size`` is always the per-process batch. Labels are int32 train ids with -1 = ignore.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from fastfcn_jax.data import transforms
from fastfcn_jax.data.builders.common import is_prepared
from fastfcn_jax.data.datasets import IGNORE_INDEX, DatasetInfo, directory, get_dataset_info

# A training share below this size (encoded) is held in memory even when shuffled with a buffer.
_CACHE_BYTES = 256 * 2**20
# The training shuffle when the whole encoded split would take more than this share of the host's memory.
SHUFFLE_BUFFER = 1024
_SHUFFLE_MEMORY_SHARE = 0.25


def _hide_accelerators_from_tf() -> None:
    """TF must never claim GPU/TPU memory that JAX needs; it only runs the host input pipeline."""
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):
        pass  # Already initialised (devices fixed) or no such device type: nothing to hide.


_hide_accelerators_from_tf()


def _info(dataset: str | DatasetInfo, data_dir: str | Path | None) -> DatasetInfo:
    return dataset if isinstance(dataset, DatasetInfo) else get_dataset_info(dataset, data_dir)


def _prepared_builder(info: DatasetInfo, data_dir: str | Path | None):
    builder = info.make_builder(data_dir)
    if not is_prepared(builder):
        raise FileNotFoundError(
            f"dataset {info.name!r} is not prepared in {builder.data_dir}; run: python -m "
            f"fastfcn_jax.data.prepare --dataset {info.name} --data-dir {data_dir or '~/tensorflow_datasets'}"
            + ("" if info.name == "synthetic_shapes" else " --manual-dir RAW_DIR")
        )
    return builder


def prepare(
    dataset: str,
    data_dir: str | Path | None,
    manual_dir: str | Path | None = None,
    *,
    source_dir: str | Path | None = None,
    overwrite: bool = False,
):
    """Builds a dataset's tfds files under ``data_dir`` (a no-op when already built); returns the builder.

    Args:
      dataset: registry name (``folder[:NAME]`` for custom data, with ``source_dir``).
      data_dir: tfds data directory to write into.
      manual_dir: folder holding the raw files of a real dataset (see its ``download_instructions``).
      source_dir: custom data folder (``images/``, ``masks/``, ``classes.json``) for ``folder``.
      overwrite: delete an already prepared copy and build it again from the raw files.
    Raises:
      FileNotFoundError: raw files are missing; the message says what to download and where to put it.
    """
    return prepare_status(dataset, data_dir, manual_dir, source_dir=source_dir, overwrite=overwrite)[0]


def prepare_on_first_process(dataset: str, data_dir: str | Path | None, manual_dir: str | Path | None) -> None:
    """:func:`prepare` by the first process of a job only, the others waiting until it is done: several
    processes building the same files into a shared ``data_dir`` would overwrite each other's."""
    if jax.process_index() == 0:
        prepare(dataset, data_dir, manual_dir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dataset prepared")


def prepare_status(
    dataset: str,
    data_dir: str | Path | None,
    manual_dir: str | Path | None = None,
    *,
    source_dir: str | Path | None = None,
    overwrite: bool = False,
):
    """:func:`prepare`, also saying whether it built (``True``) or found the dataset already prepared."""
    data_dir, manual_dir, source_dir = (directory(path) for path in (data_dir, manual_dir, source_dir))
    if dataset == "folder" or dataset.startswith("folder:"):
        from fastfcn_jax.data.builders import folder

        manual_dir = source_dir or manual_dir
        if manual_dir is None:
            if data_dir is not None and folder.is_prepared(dataset, data_dir):
                if overwrite:
                    raise FileNotFoundError(f"dataset {dataset!r}: rebuilding it (--overwrite) needs --source DIR")
                return get_dataset_info(dataset, data_dir).make_builder(data_dir), False  # class table stored
            raise FileNotFoundError(
                f"dataset {dataset!r} is not prepared in {data_dir or '(no data_dir given)'} and no source folder "
                "was given (`prepare --source DIR`, or config.dataset.manual_dir for training and evaluation).\n"
                f"{folder.INSTRUCTIONS}"
            )
        info = folder.info_from_source(dataset, manual_dir)
    else:
        info = get_dataset_info(dataset)
    builder = info.make_builder(data_dir)
    download_config = tfds.download.DownloadConfig(manual_dir=None if manual_dir is None else str(manual_dir))
    if not is_prepared(builder):
        builder.download_and_prepare(download_config=download_config)
        return builder, True
    if not overwrite:
        return builder, False
    # Rebuilt beside the old copy, which is put back if the build fails (missing or bad raw files).
    prepared = str(builder.data_dir)
    previous = f"{prepared}.previous"
    if tf.io.gfile.exists(previous):
        tf.io.gfile.rmtree(previous)
    tf.io.gfile.rename(prepared, previous)
    try:
        builder = info.make_builder(data_dir)
        builder.download_and_prepare(download_config=download_config)
    except BaseException:
        if tf.io.gfile.exists(prepared):
            tf.io.gfile.rmtree(prepared)
        tf.io.gfile.rename(previous, prepared)
        raise
    tf.io.gfile.rmtree(previous)
    return builder, True


def dataset_size(dataset: str | DatasetInfo, split: str, data_dir: str | Path | None) -> int:
    """Number of examples of a split (all processes together)."""
    info = _info(dataset, data_dir)
    return int(_prepared_builder(info, data_dir).info.splits[split].num_examples)


def _raw_label_decoder(builder):
    """Encoded example -> the stored label values [H, W] (uint8 or uint16), train ids by ``info.label_lut``."""
    label_dtype = builder.info.features["label"].tf_dtype
    return lambda example: tf.io.decode_png(example["label"], channels=1, dtype=label_dtype)[..., 0]


def _decode(info: DatasetInfo, builder):
    """Encoded example -> (uint8 image [H, W, 3], int32 train ids [H, W], -1 = ignore)."""
    lut = tf.constant(info.label_lut, tf.int32)
    raw_label = _raw_label_decoder(builder)
    return lambda example: (
        transforms.decode_rgb(example["image"]),
        tf.gather(lut, tf.cast(raw_label(example), tf.int32)),
    )


def _load(builder, split, *, shuffle_seed: int | None, cache: bool) -> tf.data.Dataset:
    """Encoded examples of ``split`` (a name, slice or ``tfds.even_splits`` entry), decoded later (after
    shuffling and skipping; by :func:`_decode`, or by the training crop itself); held in memory if ``cache``
    (:func:`training_order` decides for training)."""
    read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
    encoded = {"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()}
    ds = builder.as_dataset(
        split=split, shuffle_files=shuffle_seed is not None, read_config=read_config, decoders=encoded
    )
    if cache:
        ds = ds.cache()
        # Filled now in one pass of the encoded records (the same first pass an iterator would make): an
        # iterator that stops before the end (a short run, one batch looked at) would otherwise drop its
        # partial cache with a TensorFlow warning that reads like a user error.
        ds.reduce(np.int64(0), lambda count, _: count + 1)
    return ds


def host_memory_bytes(
    cgroup_root: str | Path = "/sys/fs/cgroup", self_cgroup: str | Path = "/proc/self/cgroup"
) -> int | None:
    """This host's memory, or the lowest memory limit of this process's cgroup and its ancestors (a container,
    a SLURM job's --mem; cgroup v2 or v1); None where unknown."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        total = None
    try:
        memberships = Path(self_cgroup).read_text().splitlines()
    except OSError:
        memberships = []
    root = Path(cgroup_root)
    candidates = [root / "memory.max", root / "memory/memory.limit_in_bytes"]  # a container's own view
    for line in memberships:  # "0::/path" (v2) or "4:memory:/path" (v1)
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        version_dir, limit_name = (
            (root, "memory.max") if controllers == "" else (root / "memory", "memory.limit_in_bytes")
        )
        if controllers not in ("", "memory") and "memory" not in controllers.split(","):
            continue
        parts = Path(path.strip() or "/").parts[1:]
        candidates += [version_dir.joinpath(*parts[:depth], limit_name) for depth in range(len(parts), 0, -1)]
    for limit_file in candidates:
        try:
            limit = int(limit_file.read_text().strip())  # "max" (no limit) is not a number
        except (OSError, ValueError):
            continue
        total = limit if total is None else min(total, limit)
    return total


@dataclasses.dataclass(frozen=True)
class TrainingOrder:
    """How this process's share of the training split is shuffled (``training_order``)."""

    examples: int  # in this process's share
    encoded_bytes: int  # of this share, as stored (what holding it in memory costs)
    buffer: int  # examples in the shuffle buffer; == examples: a uniform permutation each epoch
    cached: bool  # the encoded share held in memory (read from disk once)
    description: str

    @property
    def exact(self) -> bool:
        return self.buffer >= self.examples


def _format_bytes(count: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count / 2**10:.0f} KiB"


def training_order(
    dataset: str | DatasetInfo, *, data_dir: str | Path | None, split: str = "train", shuffle_buffer: int = 0
) -> TrainingOrder:
    """The training shuffle of this process's share of ``split``.

    The reference draws a new permutation of the whole split each epoch (``DataLoader(shuffle=True)``).
    ``shuffle_buffer=0`` does the same where the encoded share fits in a quarter of the host's memory: it is
    held there (read once) and shuffled with a buffer of all its examples; otherwise a buffer of 1024 over
    the stored order (tfds's hashed order, its files shuffled each epoch). ``shuffle_buffer=N`` > 0: a buffer
    of N examples (N >= the share's size: the uniform permutation, whatever the memory).
    """
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0 (0: the whole split if it fits in memory), got {shuffle_buffer}")
    info = _info(dataset, data_dir)
    builder = _prepared_builder(info, data_dir)
    shard = tfds.even_splits(split, jax.process_count())[jax.process_index()]
    examples = int(builder.info.splits[shard].num_examples)
    splits = builder.info.splits
    split_bytes = 0.0  # tfds counts bytes per named split only: each part of "train+validation[:50%]" in turn
    for part in split.split("+"):
        named = splits[part.split("[")[0].strip()]
        split_bytes += named.num_bytes * splits[part.strip()].num_examples / max(named.num_examples, 1)
    encoded_bytes = int(split_bytes * examples / max(splits[split].num_examples, 1))
    share = "this process's share" if jax.process_count() > 1 else "the split"
    size = f"{examples} examples, {_format_bytes(encoded_bytes)} encoded"
    note = "config.dataset.shuffle_buffer"
    if shuffle_buffer == 0:
        memory = host_memory_bytes()
        fits = memory is not None and encoded_bytes <= _SHUFFLE_MEMORY_SHARE * memory
        shuffle_buffer = examples if fits else SHUFFLE_BUFFER
        where = (
            "this host's memory is unknown"
            if memory is None
            else f"over a quarter of this host's {_format_bytes(memory)}"
        )
        note = f"{where}; config.dataset.shuffle_buffer={examples} holds it all: a new permutation each epoch"
    if shuffle_buffer >= examples:
        description = f"a new permutation of {share} each epoch ({size}, held in memory)"
        return TrainingOrder(examples, encoded_bytes, examples, True, description)
    description = f"a shuffle buffer of {shuffle_buffer} of {share}'s {size} ({note})"
    return TrainingOrder(examples, encoded_bytes, shuffle_buffer, encoded_bytes < _CACHE_BYTES, description)


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def full_examples(
    dataset: str | DatasetInfo,
    *,
    data_dir: str | Path | None,
    split: str = "validation",
    limit: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[dict[str, np.ndarray | str]]:
    """Untransformed examples (the reference's ``testval`` mode), all of ``split``, in stored order.

    ``limit`` > 0: only the first ``limit``; ``shard=(index, count)``: every ``count``-th of those from
    ``index`` (one process's share; the others are not decoded).
    Yields {'image': uint8 [H, W, 3], 'label': int32 [H, W] train ids with -1 = ignore, 'file_name': str}.
    """
    info = _info(dataset, data_dir)
    builder = _prepared_builder(info, data_dir)
    decode = _decode(info, builder)

    def with_name(example: dict) -> dict[str, tf.Tensor]:
        image, label = decode(example)
        return {"image": image, "label": label, "file_name": example["file_name"]}

    ds = _load(builder, split, shuffle_seed=None, cache=False)  # one pass, maybe partial: nothing to reuse
    if limit > 0:
        ds = ds.take(limit)
    index, count = shard
    if count > 1:
        ds = ds.shard(count, index)
    ds = ds.map(with_name, num_parallel_calls=tf.data.AUTOTUNE)
    ds = _options(ds.prefetch(tf.data.AUTOTUNE))  # deterministic: the stored order
    for example in tfds.as_numpy(ds):
        yield {**example, "file_name": example["file_name"].decode()}


def _shuffled_stream(builder, shard, order: TrainingOrder, *, seed: int) -> tf.data.Dataset:
    """This process's encoded training examples, epoch after epoch, each epoch shuffled as ``order`` says.

    Shuffled before decoding: the buffer holds encoded files, and skipping does not decode what it skips."""
    ds = _load(builder, shard, shuffle_seed=seed, cache=order.cached)
    return ds.shuffle(order.buffer, seed=seed, reshuffle_each_iteration=True).repeat()


def train_batches(
    dataset: str | DatasetInfo,
    *,
    data_dir: str | Path | None,
    batch_size: int,
    seed: int,
    crop_size: int | None = None,
    base_size: int | None = None,
    split: str = "train",
    skip_batches: int = 0,
    normalise: bool = True,
    shuffle_buffer: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator of augmented training batches of this process, from batch ``skip_batches`` on (a
    resumed run continues the interrupted run's stream; the skipped examples are read, not decoded).

    Yields:
      {'image': float32 [batch_size, crop, crop, 3] ImageNet-normalised, or with ``normalise=False`` uint8
       (the same pixels before the normalisation: a quarter of the bytes to batch, copy and send to the
       devices; the train step normalises them),
       'label': int32 [batch_size, crop, crop] train ids, -1 = ignore}.
    Each epoch is every example of this process's share once, in the order of :func:`training_order`
    (``shuffle_buffer``). Deterministic for a given seed and process layout: file order, shuffling and every
    augmentation draw (per-example seed = (seed, position in this process's stream, process index)) come from
    ``seed``.
    """
    info = _info(dataset, data_dir)
    crop_size = crop_size or info.crop_size
    base_size = base_size or info.base_size
    builder = _prepared_builder(info, data_dir)
    shard = tfds.even_splits(split, jax.process_count())[jax.process_index()]
    process, processes = jax.process_index(), jax.process_count()
    order = training_order(info, data_dir=data_dir, split=split, shuffle_buffer=shuffle_buffer)
    if order.examples < batch_size:
        where = f" ({order.examples} on each of {processes} processes)" if processes > 1 else ""
        raise ValueError(
            f"the {split!r} split of {info.name!r} has {builder.info.splits[split].num_examples} examples{where}, "
            f"fewer than a batch ({batch_size} per process): lower config.train.batch_size"
        )

    if skip_batches < 0:
        raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
    ds = _shuffled_stream(builder, shard, order, seed=seed)
    skipped = skip_batches * batch_size
    ds = ds.skip(skipped)
    raw_label, lut = _raw_label_decoder(builder), tf.constant(info.label_lut, tf.int32)

    def augment(position: tf.Tensor, example: dict) -> dict[str, tf.Tensor]:
        example_seed = tf.stack([tf.constant(seed, tf.int64), position * processes + process])
        # Decoded here, from the encoded files: a JPEG decodes only the part the crop reads, and the label's
        # raw values become train ids over the crop only.
        image, label = transforms.train_transform_encoded(
            example["image"],
            raw_label(example),
            example_seed,
            base_size=base_size,
            crop_size=crop_size,
            rotate_degrees=info.rotate_degrees,
            pad_label=info.pad_label,
            label_lut=lut,
            normalise=normalise,
        )
        return {"image": image if normalise else tf.cast(image, tf.uint8), "label": label}

    ds = ds.enumerate(start=skipped).map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    ds = _options(ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
    return iter(tfds.as_numpy(ds))


def eval_batches(
    dataset: str | DatasetInfo,
    *,
    data_dir: str | Path | None,
    batch_size: int,
    crop_size: int | None = None,
    split: str = "validation",
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over this process's shard of ``split`` with the reference's validation centre crop.

    Yields:
      {'image': float32 [batch_size, crop, crop, 3], 'label': int32 [batch_size, crop, crop],
       'valid': bool [batch_size]}. The last batch is padded with valid=False examples (image 0, label -1),
      and every process yields the same number of batches (processes with a smaller shard get one extra
      all-invalid batch) so collective eval steps never wait on a finished host.
    """
    info = _info(dataset, data_dir)
    crop_size = crop_size or info.crop_size
    builder = _prepared_builder(info, data_dir)
    shards = tfds.even_splits(split, jax.process_count())
    shard = shards[jax.process_index()]
    largest = max(builder.info.splits[s].num_examples for s in shards)
    num_batches = -(-largest // batch_size)

    # Not cached: each evaluation builds its own pipeline and reads it once (a cache would be filled in vain).
    ds = _load(builder, shard, shuffle_seed=None, cache=False)
    ds = ds.map(_decode(info, builder), num_parallel_calls=tf.data.AUTOTUNE)

    def centre_crop(image: tf.Tensor, label: tf.Tensor) -> dict[str, tf.Tensor]:
        image, label = transforms.val_transform(image, label, crop_size=crop_size)
        return {"image": image, "label": label}

    ds = ds.map(centre_crop, num_parallel_calls=tf.data.AUTOTUNE)
    ds = _options(ds.batch(batch_size).prefetch(tf.data.AUTOTUNE))

    def pad(batch: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        count = 0 if batch is None else len(batch["label"])
        missing = batch_size - count
        image = np.zeros((batch_size, crop_size, crop_size, 3), np.float32)
        label = np.full((batch_size, crop_size, crop_size), IGNORE_INDEX, np.int32)
        if batch is not None:
            image[:count], label[:count] = batch["image"], batch["label"]
        valid = np.arange(batch_size) < batch_size - missing
        return {"image": image, "label": label, "valid": valid}

    def generate() -> Iterator[dict[str, np.ndarray]]:
        produced = 0
        for batch in tfds.as_numpy(ds):
            produced += 1
            yield pad(batch) if len(batch["label"]) < batch_size else {**batch, "valid": np.ones(batch_size, bool)}
        for _ in range(num_batches - produced):
            yield pad(None)

    return generate()
