# The run-time instruction-set switch of cylstm's own SIMD kernels (levels: _isa.h).
# A kernel module registers a hook at import; the hook is called with the level then
# and on every change, and sets the module's function pointers from its per-level
# tables, so a kernel call pays nothing for the switch.

ctypedef void (*level_hook)(int level) noexcept nogil

cdef void on_level_change(level_hook hook) noexcept
