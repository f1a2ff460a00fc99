/* A concat input requantized to the output's scale. */
static void ${name}(const ptq_rescale *r, const ${in_t} *in, ${out_t} *out, int32_t size)
{
    for (int32_t i = 0; i < size; ++i) {
        out[i] = (${out_t})ptq_requantize(in[i], r->multiplier, r->shift, r->out_min, r->out_max);
    }
}
