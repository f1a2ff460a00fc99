/* TFLite's int8 HARD_SWISH, x * relu6(x + 3) / 6, in 16-bit fixed point (pipeline.quant.ops.hardswish):
 * int16_t values, their products in int32_t (a 16-bit int could not hold them), gemmlowp's rounding
 * helpers below. C99's / truncates toward zero (6.5.5), and no negative value is ever shifted. */
typedef struct {
    int32_t size;               /* values */
    int16_t reluish_multiplier; /* relu6(x + 3) / 6 on the scale where 3.0 is 2^15: int16 Q0.15 ... */
    int32_t reluish_exponent;   /* ... times 2^reluish_exponent, in [-15, 30] */
    int16_t output_multiplier;  /* S_in / (2^7 S_out): int16 Q0.15 ... */
    int32_t output_exponent;    /* ... times 2^output_exponent, in [-15, 0] */
    int32_t out_min, out_max;   /* the output's range */
} ptq_hardswish_op;

/* gemmlowp's SaturatingRoundingDoublingHighMul: a * b / 2^15 rounded half away from zero; INT16_MIN * INT16_MIN,
 * the one product whose result leaves int16, saturates. |a * b| <= 2^30 and |nudge| < 2^14: the sum fits int32. */
static int16_t ptq_srdhm16(int16_t a, int16_t b)
{
    const int32_t product = (int32_t)a * b;
    const int32_t nudge = product >= 0 ? ((int32_t)1 << 14) : 1 - ((int32_t)1 << 14);
    if (a == INT16_MIN && b == INT16_MIN) {
        return INT16_MAX;
    }
    return (int16_t)((product + nudge) / ((int32_t)1 << 15));
}

/* TFLite's SaturatingDoublingHighMul: a * b / 2^15 truncated toward zero; INT16_MIN * INT16_MIN saturates. */
static int16_t ptq_sdhm16(int16_t a, int16_t b)
{
    if (a == INT16_MIN && b == INT16_MIN) {
        return INT16_MAX;
    }
    return (int16_t)((int32_t)a * b / ((int32_t)1 << 15));
}

/* gemmlowp's SaturatingLeftShift: value * 2^amount saturated to int16, 0 <= amount <= 29. A product, not a
 * shift (a negative value is never shifted), in int64: |value| * 2^29 <= 2^44. */
static int16_t ptq_saturating_left_shift16(int16_t value, int32_t amount)
{
    const int64_t shifted = (int64_t)value * ((int64_t)1 << amount);
    return (int16_t)(shifted < INT16_MIN ? INT16_MIN : (shifted > INT16_MAX ? INT16_MAX : shifted));
}

/* gemmlowp's RoundingDivideByPOT: x / 2^exponent rounded half away from zero, 0 <= exponent <= 15, |x| <= 2^15.
 * gemmlowp adds (x & mask) > threshold to the arithmetic shift x >> exponent; C99 leaves >> of a negative value
 * implementation-defined, so a negative x is rounded as minus its magnitude rounded half up, the same value. */
static int32_t ptq_rounding_divide_by_pot(int32_t x, int32_t exponent)
{
    if (exponent == 0) {
        return x;
    }
    const int32_t half = (int32_t)1 << (exponent - 1);
    return x >= 0 ? (x + half) >> exponent : -((half - x) >> exponent);
}

/* One output for input code q, step by step as hardswish_reference. */
static int32_t ptq_hardswish_value(const ptq_hardswish_op *p, int32_t q)
{
    const int16_t hires = (int16_t)(q * ((int32_t)1 << 7)); /* on the scale S_in / 2^7; |q| <= 255 keeps it int16 */
    const int16_t preshift = ptq_srdhm16(hires, p->output_multiplier);
    int16_t reluish = hires;
    if (p->reluish_exponent > 0) {
        reluish = ptq_saturating_left_shift16(reluish, p->reluish_exponent - 1);
    }
    reluish = ptq_srdhm16(reluish, p->reluish_multiplier);
    if (p->reluish_exponent > 0) {
        reluish = ptq_saturating_left_shift16(reluish, 1);
    }
    if (p->reluish_exponent < 0) {
        reluish = (int16_t)ptq_rounding_divide_by_pot(reluish, -p->reluish_exponent);
    }
    /* [-1, 1) to [0, 1): reluish + 2^15 is in [0, 2^16), so the shift is of a non-negative value */
    reluish = (int16_t)((reluish + ((int32_t)1 << 15)) >> 1);
    const int32_t out = ptq_rounding_divide_by_pot(ptq_sdhm16(reluish, preshift), -p->output_exponent);
    return out < p->out_min ? p->out_min : (out > p->out_max ? p->out_max : out);
}
