"""The DALI pipeline of one split: the webdataset reader, then on CUDA decoding on the GPU (`mixed`) and on the
CPU DALI's CPU decoder. Training decodes only the random crop window (`fn.decoders.image_random_crop`), then
resizes, flips and normalises in one `fn.crop_mirror_normalize`; its batches also name their samples (a third
output, `source_info`). A view of another tool's shards has no `cls` members (`dali_view`): its batches are
(images, names) in training and validation alike, and the loader looks the labels up."""
from __future__ import annotations

from pathlib import Path

import torch

from ddmim.data.dali_format import Shards, list_shards, sample_count
from ddmim.data.loader_spec import LoaderSpec
from ddmim.data.workers import loader_threads

READER = "Reader"  # the reader's name, by which DALI's iterator finds the epoch's size and its position


def shuffle_buffer(batch_size: int, samples_per_rank: int) -> int:
    """Samples the reader draws batches from: several batches, bounded by this rank's part of the data."""
    return max(1, min(samples_per_rank, max(4096, 8 * batch_size)))


def build_pipeline(folder: Path, spec: LoaderSpec, *, gpu: bool, **options):
    """The built pipeline (`define_pipeline`'s options), on the current CUDA device when `gpu`."""
    pipe = define_pipeline(folder, spec, gpu=gpu, device_id=torch.cuda.current_device() if gpu else None, **options)
    pipe.build()
    return pipe


def define_pipeline(folder: Path, spec: LoaderSpec, *, train: bool, gpu: bool, device_id: int | None,
                    shard_id: int = 0, num_shards: int = 1, batch_size: int | None = None,
                    channels_last: bool = False, threads: int | None = None,
                    shards: Shards | None = None, host_labels: bool = False, **pipeline_kw):
    """The pipeline, not built: `gpu` decodes with nvJPEG ("mixed") and leaves the batches on the device.
    `device_id` None defines even a GPU pipeline where there is no CUDA (so that its operators and arguments
    are checked on any machine). `shards`: (tars, indexes) to read instead of the folder's own (after samples
    were left out); `host_labels`: the shards hold no labels (a view); `pipeline_kw`: more options of the
    Pipeline (enable_checkpointing, checkpoint)."""
    from nvidia.dali import fn, pipeline_def, types

    tars, indexes = shards or list_shards(folder)
    size = spec.img_size
    batch_size = batch_size or spec.batch_size
    mean = [m * 255 for m in spec.data.mean]
    std = [s * 255 for s in spec.data.std]
    decode_device = "mixed" if gpu else "cpu"
    layout = "HWC" if channels_last else "CHW"
    interp = types.INTERP_CUBIC if spec.data.interpolation == "bicubic" else types.INTERP_LINEAR

    @pipeline_def
    def pipeline():
        read = fn.readers.webdataset(
            paths=tars, index_paths=indexes, ext=["jpg"] if host_labels else ["jpg", "cls"],
            dtypes=[types.UINT8] if host_labels else [types.UINT8, types.INT32],
            shard_id=shard_id, num_shards=num_shards, random_shuffle=train, stick_to_shard=False,
            initial_fill=shuffle_buffer(batch_size, sample_count(indexes) // num_shards),
            pad_last_batch=True, name=READER, seed=spec.seed)
        jpegs, labels = (read[0] if isinstance(read, (list, tuple)) else read, None) if host_labels else read
        if train:
            images = fn.decoders.image_random_crop(
                jpegs, device=decode_device, output_type=types.RGB, random_area=list(spec.data.crop_scale),
                random_aspect_ratio=list(spec.data.crop_ratio), num_attempts=10)
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=interp, antialias=False)
            mirror = fn.random.coin_flip(probability=spec.data.hflip) if spec.data.hflip > 0 else 0
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout, mean=mean,
                                              std=std, mirror=mirror)
        else:
            images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=round(size / spec.data.val_crop_ratio), interp_type=interp)
            images = fn.crop_mirror_normalize(images, crop=(size, size), dtype=types.FLOAT, output_layout=layout,
                                              mean=mean, std=std)
        # which samples the batch holds, by shard and offset ('SHARD.tar:OFFSET:KEY.jpg'): see dali_epoch
        where = fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0) if train or host_labels else None
        if host_labels:
            return images, where
        if gpu:
            labels = labels.gpu()
        return (images, labels, where) if train else (images, labels)

    return pipeline(batch_size=batch_size, num_threads=threads or loader_threads(spec.data.num_workers),
                    device_id=device_id, seed=spec.seed + shard_id, prefetch_queue_depth=2, **pipeline_kw)
