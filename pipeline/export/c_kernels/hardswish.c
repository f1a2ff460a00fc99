static void ${name}(const ptq_hardswish_op *p, const ${in_t} *in, ${out_t} *out)
{
    for (int32_t i = 0; i < p->size; ++i) {
        out[i] = (${out_t})ptq_hardswish_value(p, in[i]);
    }
}
