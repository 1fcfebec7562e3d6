"""The ``kvtc`` method of ``kvsqueeze eval`` (spelling ``kvtc:RATIO``)."""

from __future__ import annotations

from pathlib import Path

from kvsqueeze.cache import CompressedPrefix, PrefixCache
from kvsqueeze.errors import KvsqueezeError
from kvsqueeze.methods.base import CompressionMethod, register
from kvsqueeze.methods.kvtc import codec
from kvsqueeze.methods.kvtc.calibrate import calibration_for, model_fingerprint
from kvsqueeze.methods.kvtc.prefix import compress_prefix


@register
class KVTC(CompressionMethod):
    """Transform coding of the prefix cache (sinks and the recent window stay exact).

    ``ratio`` is the target over the compressed tokens (every blob byte against 16-bit K and V of
    those tokens). ``ratio_achieved`` counts the exempt tokens too; the ratio over compressed tokens
    is reported as ``ratio_compressed``. ``calibration``: a file from ``kvsqueeze kvtc calibrate``
    or a :class:`~kvsqueeze.methods.kvtc.codec.Calibration`; without one, the model's default
    calibration is made on first use (``$KVSQUEEZE_HOME/kvtc/<model fingerprint>.safetensors``).
    """

    name = "kvtc"
    summary = "KV Cache Transform Coding: PCA + DP bit allocation + quantization + range coding"
    ratio_unit = "bytes held (blob + exempt tokens) vs dense 16-bit K+V of the prefix"

    def __init__(self, ratio=None, sinks=4, recent=64, calibration=None, **options):
        super().__init__(ratio, sinks, recent, **options)
        self.calibration: codec.Calibration | None = None
        if isinstance(calibration, codec.Calibration):
            self.calibration = calibration
            self.calibration_path = None
        else:
            self.calibration_path = Path(calibration) if calibration else None
            if self.calibration_path is not None:
                self.calibration = codec.Calibration.load(self.calibration_path)

    def prepare(self, model) -> None:
        """Bind the calibration of ``model`` (made and cached on first use when none was given)."""
        fp = model_fingerprint(model)
        if self.calibration is None:
            self.calibration_path = calibration_for(model)
            self.calibration = codec.Calibration.load(self.calibration_path)
        if self.calibration.model_fingerprint != fp:
            raise KvsqueezeError(
                f"calibration={str(self.calibration_path or 'given')!r}: made for model "
                f"{self.calibration.model_fingerprint}, this model is {fp}; calibrate for this model")

    def compress(self, cache: PrefixCache) -> CompressedPrefix:
        if self.calibration is None:
            raise KvsqueezeError("kvtc needs a calibration: pass calibration=FILE or call prepare(model)")
        start, end = self.exempt_slices(cache.n_tokens)
        return compress_prefix(self.calibration, cache, self.ratio, start, end)
