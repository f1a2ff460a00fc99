/* The integer residual add (TFLite's ADD): each input q becomes q * 2^left_shift (a product, never
 * a shift of a negative value), is requantized to the common grid, the two are summed in int32
 * and the sum requantized to the output. The generator checks |q * 2^left_shift| and the sum in int32. */
typedef struct {
    int32_t size;        /* values per input */
    int32_t left_factor; /* 2^left_shift */
    ptq_rescale a, b;    /* each input to the common grid, int32 saturation */
    ptq_rescale out;     /* the sum to the output scale, with the fused activation's clamp */
} ptq_add_op;
