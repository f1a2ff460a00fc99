/* A standalone ReLU / ReLU6: the integers clamped to [low, high] at an unchanged scale. */
static void ${name}(const ${t} *in, ${t} *out, int32_t size, int32_t low, int32_t high)
{
    for (int32_t i = 0; i < size; ++i) {
        const int32_t value = in[i];
        out[i] = (${t})(value < low ? low : (value > high ? high : value));
    }
}
