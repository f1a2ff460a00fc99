static void ${name}(const ptq_add_op *p, const ${a_t} *a, const ${b_t} *b, ${out_t} *out)
{
    for (int32_t i = 0; i < p->size; ++i) {
        const int32_t scaled_a = ptq_requantize(a[i] * p->left_factor, p->a.multiplier, p->a.shift,
                                                p->a.out_min, p->a.out_max);
        const int32_t scaled_b = ptq_requantize(b[i] * p->left_factor, p->b.multiplier, p->b.shift,
                                                p->b.out_min, p->b.out_max);
        out[i] = (${out_t})ptq_requantize(scaled_a + scaled_b, p->out.multiplier, p->out.shift,
                                        p->out.out_min, p->out.out_max);
    }
}
