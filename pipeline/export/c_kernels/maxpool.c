/* Max over each window clipped to the map: padding acts as -infinity, as in PyTorch.
 * Every window holds at least one input value (check_deployable: padding <= kernel / 2). */
static void ${name}(const ptq_pool *p, const ${t} *in, ${t} *out)
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
                ${t} best = ${t_min};
                for (int32_t y = y_begin; y < y_end; ++y) {
                    for (int32_t x = x_begin; x < x_end; ++x) {
                        const ${t} value = in[(c * p->in_h + y) * p->in_w + x];
                        if (value > best) {
                            best = value;
                        }
                    }
                }
                *out++ = best;
            }
        }
    }
}
