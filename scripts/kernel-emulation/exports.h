// Appended to the kernel source by fakecuda's nvrtcCompileProgram: one C entry point per kernel that
// unpacks cuLaunchKernel's parameter array by the kernel's own signature.
#include <utility>

template <typename... P, std::size_t... I>
void emu_call(void (*k)(P...), emu_dim3 grid, unsigned block, void** params, std::index_sequence<I...>) {
    emu_launch(k, grid, block, *static_cast<P*>(params[I])...);
}
template <typename... P>
void emu_call(void (*k)(P...), emu_dim3 grid, unsigned block, void** params) {
    emu_call(k, grid, block, params, std::index_sequence_for<P...>{});
}
#define EMU_EXPORT(name)                                                                              \
    extern "C" void emu_kernel_##name(unsigned gx, unsigned gy, unsigned gz, unsigned bx, void** params) { \
        emu_call(name, emu_dim3{gx, gy, gz}, bx, params);                                             \
    }
EMU_EXPORT(dequant_q8_0)
EMU_EXPORT(dequant_q4_0)
EMU_EXPORT(dequant_q4_1)
EMU_EXPORT(f16_to_bf16)
EMU_EXPORT(f32_to_bf16)
EMU_EXPORT(embed)
EMU_EXPORT(rms_norm)
EMU_EXPORT(rope_kv)
EMU_EXPORT(attention)
EMU_EXPORT(silu_mul)
EMU_EXPORT(sample)
