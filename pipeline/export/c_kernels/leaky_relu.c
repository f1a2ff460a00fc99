/* TFLite's LEAKY_RELU: each value requantized by the rescale of its sign (q >= 0: positive,
 * M_pos = S_in / S_out; q < 0: negative, M_neg = negative_slope * S_in / S_out), each saturating
 * to the output's range. |q| <= 255 and multiplier < 2^31: ptq_requantize's product fits int64. */
static void ${name}(const ptq_rescale *positive, const ptq_rescale *negative, const ${in_t} *in, ${out_t} *out,
                    int32_t size)
{
    for (int32_t i = 0; i < size; ++i) {
        const int32_t value = in[i];
        const ptq_rescale *r = value >= 0 ? positive : negative;
        out[i] = (${out_t})ptq_requantize(value, r->multiplier, r->shift, r->out_min, r->out_max);
    }
}
