/* bias + sum of weight * input over the windows of output row (oc, oy), into acc[0 .. out_w), for
 * ${in_t} inputs. Output channel oc reads the group_in_c input channels of its group, oc / group_out_c.
 * Zero padding adds nothing, so each kernel tap visits only the outputs whose input lies in the
 * map. Every partial sum, in any order of the terms, is at most sum|w| * max|x| + |bias| < 2^31
 * (max|x| from the input's range: 128 for int8, 255 for uint8; checked by the generator): no int32 overflow. */
static void ${name}(const ptq_conv *l, const ${in_t} *in, int32_t oc, int32_t oy, int32_t *acc)
{
    /* Locals, not l->...: acc is written in the inner loop and could alias *l as far as the compiler knows. */
    const int32_t group_in_c = l->group_in_c, in_h = l->in_h, in_w = l->in_w, out_w = l->out_w;
    const int32_t kernel_h = l->kernel_h, kernel_w = l->kernel_w, stride_w = l->stride_w;
    const int32_t y0 = oy * l->stride_h - l->pad_h;
    const int32_t ky_begin = y0 < 0 ? -y0 : 0;
    const int32_t ky_end = in_h - y0 < kernel_h ? in_h - y0 : kernel_h;
    const int8_t *weights = l->weight + oc * group_in_c * kernel_h * kernel_w;
    const ${in_t} *group_in = in + (oc / l->group_out_c) * group_in_c * in_h * in_w;
    const int32_t bias = l->bias[oc];
    for (int32_t ox = 0; ox < out_w; ++ox) {
        acc[ox] = bias;
    }
    for (int32_t kx = 0; kx < kernel_w; ++kx) {
        /* Input column ox * stride_w + offset must lie in [0, in_w): ox in [ox_begin, ox_end). */
        const int32_t offset = kx - l->pad_w;
        const int32_t ox_begin = offset >= 0 ? 0 : (stride_w - 1 - offset) / stride_w;
        const int32_t last = in_w - 1 - offset; /* the largest ox * stride_w allowed */
        const int32_t ox_stop = last < 0 ? 0 : last / stride_w + 1;
        const int32_t ox_end = ox_stop < out_w ? ox_stop : out_w;
        for (int32_t ic = 0; ic < group_in_c; ++ic) {
            for (int32_t ky = ky_begin; ky < ky_end; ++ky) {
                const int32_t w = weights[(ic * kernel_h + ky) * kernel_w + kx];
                const ${in_t} *row = group_in + (ic * in_h + y0 + ky) * in_w;
                if (stride_w == 1) { /* the common case, a separate loop so the compiler can vectorize it */
                    for (int32_t ox = ox_begin; ox < ox_end; ++ox) {
                        acc[ox] += w * row[ox + offset];
                    }
                } else {
                    for (int32_t ox = ox_begin; ox < ox_end; ++ox) {
                        acc[ox] += w * row[ox * stride_w + offset];
                    }
                }
            }
        }
    }
}
