/* The int32 sum of each window (zero padding adds 0), requantized: the sum itself (the area, padding
 * included, inside the multiplier S_in / (S_out * area)), or, with mean_count > 0, TFLite's AVERAGE_POOL_2D
 * mean of the values less mean_zero_point, rounded half away from zero, then the zero point added back.
 * |sum| <= max|x| * area < 2^31 (checked). */
static void ${name}(const ptq_pool *p, const ptq_rescale *r, int32_t mean_count, int32_t mean_zero_point,
                    const ${in_t} *in, ${out_t} *out)
{
    for (int32_t c = 0; c < p->channels; ++c) {
        for (int32_t oy = 0; oy < p->out_h; ++oy) {
            const int32_t y0 = oy * p->stride_h - p->pad_h;
            const int32_t y_begin = y0 < 0 ? 0 : y0;
            const int32_t y_end = y0 + p->kernel_h < p->in_h ? y0 + p->kernel_h : p->in_h;
            for (int32_t ox = 0; ox < p->out_w; ++ox) {
                const int32_t x0 = ox * p->stride_w - p->pad_w;
                const int32_t x_begin = x0 < 0 ? 0 : x0;
                const int32_t x_end = x0 + p->kernel_w < p->in_w ? x0 + p->kernel_w : p->in_w;
                int32_t value = 0;
                for (int32_t y = y_begin; y < y_end; ++y) {
                    for (int32_t x = x_begin; x < x_end; ++x) {
                        value += in[(c * p->in_h + y) * p->in_w + x];
                    }
                }
                if (mean_count > 0) {
                    const int32_t centered = value - mean_zero_point * mean_count;
                    const int32_t magnitude = ((centered >= 0 ? centered : -centered) + mean_count / 2) / mean_count;
                    value = (centered >= 0 ? magnitude : -magnitude) + mean_zero_point;
                }
                *out++ = (${out_t})ptq_requantize(value, r->multiplier, r->shift, r->out_min, r->out_max);
            }
        }
    }
}
