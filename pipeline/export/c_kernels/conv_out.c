static void ${name}(const ptq_conv *l, const ${in_t} *in, ${out_t} *out)
{
    int32_t acc[PTQ_ROW_MAX]; /* one output row of accumulators, on the stack */
    for (int32_t oc = 0; oc < l->out_c; ++oc) {
        for (int32_t oy = 0; oy < l->out_h; ++oy) {
            ${accumulate_row}(l, in, oc, oy, acc);
            for (int32_t ox = 0; ox < l->out_w; ++ox) {
                *out++ = ${store};${store_comment}
            }
        }
    }
}
