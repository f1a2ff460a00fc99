/* A concat input already at the output's scale and range: its values as they are. */
static void ${name}(const ${t} *in, ${t} *out, int32_t size)
{
    for (int32_t i = 0; i < size; ++i) {
        out[i] = in[i];
    }
}
