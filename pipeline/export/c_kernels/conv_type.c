#define PTQ_ROW_MAX ${row_max} /* the widest layer output row: int32 accumulators on the stack */

/* A conv2d (any groups), or a linear layer as a 1x1 convolution on a (K, 1, 1) map. */
typedef struct {
    const int8_t *weight;      /* (out_c, group_in_c, kernel_h, kernel_w), row-major */
    const int32_t *bias;       /* (out_c), at the accumulator scale S_in * S_w */
    const int32_t *multiplier; /* Q0.31, 1 or out_c values; NULL: output the raw accumulator */
    const int32_t *shift;      /* M = multiplier * 2^(shift - 31) */
    int32_t channel_step;      /* 1: one multiplier and shift per output channel; 0: one for all */
    int32_t out_min, out_max;  /* saturation: the Requantize's, or the raw logits' (out_min 0: ReLU) */
    int32_t group_in_c, group_out_c; /* input and output channels per group (depthwise: 1 and 1) */
    int32_t in_h, in_w, out_c, out_h, out_w;
    int32_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
} ptq_conv;

/* One output value from its accumulator: requantized and saturated, or the raw accumulator. */
static int32_t ptq_output(const ptq_conv *l, int32_t acc, int32_t oc)
{
    if (l->multiplier == NULL) {
        return acc < l->out_min ? l->out_min : acc; /* raw logits: out_min is INT32_MIN, or 0 for a ReLU */
    }
    return ptq_requantize(acc, l->multiplier[oc * l->channel_step], l->shift[oc * l->channel_step],
                          l->out_min, l->out_max);
}
