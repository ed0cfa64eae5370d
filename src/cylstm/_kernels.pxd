# The C kernels' declarations, in one place for every module that calls them: the
# per-level function tables of _activations.h, _cell.h and _rgemm.h (each picks the
# AVX-512, AVX2 or baseline variant for a level; see _isa.h).

cdef extern from "_activations.h" nogil:
    ctypedef struct cy_act_f32:
        void (*sigmoid_add)(float* z, const float* hz, int n) noexcept nogil
        void (*tanh_add)(float* z, const float* hz, int n) noexcept nogil
    cy_act_f32 cy_act_select(int level)
    ctypedef struct cy_act_f64:
        void (*sigmoid_add)(double* z, const double* hz, int n) noexcept nogil
        void (*tanh_add)(double* z, const double* hz, int n) noexcept nogil
    cy_act_f64 cy_act_select_f64(int level)
    # the baseline versions, which give the same bits as every level's (_activations.h)
    void cy_sigmoid_add_f64(double* z, const double* hz, int n)
    void cy_tanh_add_f64(double* z, const double* hz, int n)

cdef extern from "_cell.h" nogil:
    ctypedef struct cy_cell_fns:
        void (*cell_f32)(float* c, float* m, float* tc, const float* z, int H,
                         int gs) noexcept nogil
        void (*cell_f64)(double* c, double* m, double* tc, const double* z, int H,
                         int gs) noexcept nogil
        void (*gate_grads_f32)(float* dz, float* dc, const float* z, const float* tc,
                               const float* cprev, const float* dm, int H) noexcept nogil
        void (*gate_grads_f64)(double* dz, double* dc, const double* z, const double* tc,
                               const double* cprev, const double* dm, int H) noexcept nogil
    cy_cell_fns cy_cell_select(int level)

cdef extern from "_rgemm.h" nogil:
    ctypedef void (*cy_gemm_packed_fn)(int, int, int, const float*, int, const float*,
                                       float*, int) noexcept nogil
    ctypedef void (*cy_dot_rows_fn)(int, int, int, const float*, int, const float*, int,
                                    float*, int) noexcept nogil
    size_t cy_packed_size(int K, int N)
    int cy_pack_level
    void cy_pack_f32(float* packed, const float* w, int K, int N, int ldw, int trans)
    void cy_pack_rows_f32(float* packed, const float* w, int K, int N, int ldw, int trans,
                          int k0, int Kt)
    cy_gemm_packed_fn cy_rgemm_select(int level)
    ctypedef void (*cy_gemm_packed64_fn)(int, int, int, const double*, int, const double*,
                                         double*, int) noexcept nogil
    size_t cy_packed_size_f64(int K, int N)
    void cy_pack_f64(double* packed, const double* w, int K, int N, int ldw, int trans)
    void cy_pack_rows_f64(double* packed, const double* w, int K, int N, int ldw, int trans,
                          int k0, int Kt)
    cy_gemm_packed64_fn cy_rgemm64_select(int level)
    cy_dot_rows_fn cy_dot_select(int level)
    ctypedef void (*cy_bgemm_fn)(int, int, int, int, const float*, int, const float*, int,
                                 float*, int, int) noexcept nogil
    cy_bgemm_fn cy_bgemm_select(int level)
