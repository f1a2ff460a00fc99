/* floor(x / 2^n) for 0 < n < 63: the arithmetic right shift of the Python engine.
 * C99 leaves >> of a negative value implementation-defined, so a negative x is
 * shifted as ~x = -x - 1 >= 0 (two's complement): floor(x / 2^n) = ~(~x >> n). */
static int64_t ptq_floor_shift(int64_t x, int32_t n)
{
    return x >= 0 ? x >> n : ~(~x >> n);
}

/* pipeline.quant.fixed_point.requantize: y = floor((acc * multiplier + 2^(30 - shift)) / 2^(31 - shift)),
 * i.e. acc * M rounded half up, then saturated to [out_min, out_max]. |acc * multiplier| < 2^62 and
 * the rounding term is at most 2^61, so the int64 sum cannot overflow. */
static int32_t ptq_requantize(int32_t acc, int32_t multiplier, int32_t shift, int32_t out_min, int32_t out_max)
{
    const int32_t total_shift = 31 - shift;
    const int64_t rounding = (int64_t)1 << (total_shift - 1);
    const int64_t y = ptq_floor_shift((int64_t)acc * multiplier + rounding, total_shift);
    return (int32_t)(y < out_min ? out_min : (y > out_max ? out_max : y));
}

/* One scalar requantization: M = multiplier * 2^(shift - 31), saturation [out_min, out_max]. */
typedef struct {
    int32_t multiplier, shift, out_min, out_max;
} ptq_rescale;
