/* pipeline.quant.fixed_point.requantize with rounding "double", TFLite's MultiplyByQuantizedMultiplier:
 * x = acc * 2^max(shift, 0) (in int32 for TFLite, which the engine checks), then gemmlowp's
 * SaturatingRoundingDoublingHighMul, (x * multiplier + nudge) / 2^31 truncated toward zero (C99's integer
 * division), then RoundingDivideByPOT by 2^max(-shift, 0), half away from zero, then saturation.
 * |x * multiplier| < 2^62, so nothing overflows int64, and no negative value is ever shifted. */
static int32_t ptq_requantize(int32_t acc, int32_t multiplier, int32_t shift, int32_t out_min, int32_t out_max)
{
    const int32_t left_shift = shift > 0 ? shift : 0;
    const int32_t right_shift = shift > 0 ? 0 : -shift;
    const int64_t product = (int64_t)acc * ((int64_t)1 << left_shift) * multiplier;
    const int64_t nudge = product >= 0 ? ((int64_t)1 << 30) : 1 - ((int64_t)1 << 30);
    const int64_t high = (product + nudge) / ((int64_t)1 << 31);
    const int64_t divisor = (int64_t)1 << right_shift;
    const int64_t magnitude = ((high >= 0 ? high : -high) + divisor / 2) / divisor;
    const int64_t y = high >= 0 ? magnitude : -magnitude;
    return (int32_t)(y < out_min ? out_min : (y > out_max ? out_max : y));
}

/* One scalar requantization: M = multiplier * 2^(shift - 31), saturation [out_min, out_max]. */
typedef struct {
    int32_t multiplier, shift, out_min, out_max;
} ptq_rescale;
