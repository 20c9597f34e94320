/* The near-copy lookup of openexample/perceptual.py in one compiled call.
 *
 * With numpy, a lookup is ~12 small numpy calls (two products, a scale, a compare, a
 * pack, an XOR-popcount scan, a thumbnail check): 10-20 us on the agent's fast path,
 * against a budget of 20 us at p99 (issue 18). This does the same arithmetic in ~1 us.
 * It is optional: perceptual.py falls back to numpy when it was not built, and
 * tests/test_near_kernel.py checks the two agree bit for bit on keys and to rounding on
 * thumbnails.
 *
 *   key_thumb(img, h, w, rows, cols, thumb_out) -> key
 *   lookup(img, h, w, rows, cols, keys, n, thumbs, radius, tol, min_bits, max_bits)
 *       -> (index, distance) | None
 *
 * img: float32 [h, w]; rows: float32 [8, h]; cols: float32 [w, 17] (9 thumbnail columns,
 * then 8 difference columns); keys: uint64 [>= n]; thumbs: float32 [>= n, 8, 9].
 * Whatever Python passes, a buffer too short for its count (n < 0, or n * size past
 * the 64-bit range), misaligned, or an integer out of C's range is a ValueError; a
 * buffer that is not contiguous or not writable a ValueError or TypeError. Never read
 * past a buffer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

#define ROWS 8
#define COLS 9
#define VCOLS 17
#define THUMB (ROWS * COLS)
#define MAX_SIDE 4096
#define DEAD_ZONE 1e-5 /* _RELATIVE_TOLERANCE in perceptual.py */

static int check_aligned(Py_buffer *b, Py_ssize_t need, size_t align, const char *what) {
    if (b->len < need) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, need %zd", what, b->len, need);
        return -1;
    }
    if ((uintptr_t)b->buf % align != 0) { /* float32 / uint64 loads: never misaligned */
        PyErr_Format(PyExc_ValueError, "%s: buffer not aligned to %zu bytes", what, align);
        return -1;
    }
    return 0;
}

static int check(Py_buffer *b, Py_ssize_t need, const char *what) { /* float32 */
    return check_aligned(b, need, 4, what);
}

/* `count` items of `size` bytes in b (count >= 0, no overflow of count * size). */
static int check_items(Py_buffer *b, Py_ssize_t count, Py_ssize_t size, const char *what) {
    if (count < 0 || count > b->len / size) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, need %zd items of %zd", what, b->len,
                     count, size);
        return -1;
    }
    return check_aligned(b, count * size, size == 8 ? 8 : 4, what);
}

/* Arguments out of C's range are bad values (ValueError), as for the checks below. */
static void overflow_as_value_error(void) {
    if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_Format(PyExc_ValueError, "argument out of range: %S", value ? value : Py_None);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
    }
}

/* The key of img and its thumbnail (scaled by the image's largest absolute value).
 * Both area matrices are banded: zero weights are skipped, so a 28 x 28 input costs
 * ~1,300 multiply-adds. The differences are taken between thumbnail cells (in double),
 * where the numpy path multiplies by difference columns (in float32): the same
 * quantity, equal to rounding. */
static uint64_t key_of(const float *a, int h, int w, const float *rows, const float *cols,
                       float *thumb) {
    double t[MAX_SIDE]; /* one output row of rows @ a at a time */
    double v[ROWS][COLS] = {{0.0}};
    /* each input column's span of thumbnail columns (0..9: a byte each, ~8 KB of stack) */
    unsigned char lo[MAX_SIDE], hi[MAX_SIDE];
    float m[8] = {0.0f}; /* eight running maxima: no loop-carried dependency chain */
    Py_ssize_t size = (Py_ssize_t)h * w, i = 0;
    for (; i + 8 <= size; i += 8) {
        for (int j = 0; j < 8; j++) {
            float x = fabsf(a[i + j]);
            m[j] = x > m[j] ? x : m[j];
        }
    }
    for (; i < size; i++) {
        float x = fabsf(a[i]);
        m[0] = x > m[0] ? x : m[0];
    }
    float scale = 0.0f;
    for (int j = 0; j < 8; j++) scale = m[j] > scale ? m[j] : scale;
    for (int c = 0; c < w; c++) {
        const float *cc = cols + (Py_ssize_t)c * VCOLS;
        int k = 0;
        while (k < COLS - 1 && cc[k] == 0.0f) k++;
        lo[c] = k;
        while (k < COLS && cc[k] != 0.0f) k++;
        hi[c] = k;
    }
    for (int r = 0; r < ROWS; r++) {
        for (int c = 0; c < w; c++) t[c] = 0.0;
        for (int y = 0; y < h; y++) {
            double wr = rows[r * h + y];
            if (wr == 0.0) continue;
            const float *row = a + (Py_ssize_t)y * w;
            for (int c = 0; c < w; c++) t[c] += wr * row[c];
        }
        for (int c = 0; c < w; c++) {
            const float *cc = cols + (Py_ssize_t)c * VCOLS;
            for (int k = lo[c]; k < hi[c]; k++) v[r][k] += t[c] * cc[k];
        }
    }
    uint64_t key = 0;
    double dead = DEAD_ZONE * (double)scale;
    for (int r = 0; r < ROWS; r++) {
        for (int k = 0; k < ROWS; k++) key = (key << 1) | (uint64_t)(v[r][k + 1] - v[r][k] > dead);
        for (int k = 0; k < COLS; k++) {
            thumb[r * COLS + k] = (float)(scale > 0.0f ? v[r][k] / scale : v[r][k]);
        }
    }
    return key;
}

static int parse_image(Py_buffer *img, int h, int w, Py_buffer *rows, Py_buffer *cols) {
    if (h < 1 || w < 2 || h > MAX_SIDE || w > MAX_SIDE) {
        PyErr_Format(PyExc_ValueError, "image %d x %d: 1..%d rows, 2..%d columns", h, w,
                     MAX_SIDE, MAX_SIDE);
        return -1;
    }
    if (check(img, (Py_ssize_t)h * w * 4, "img") || check(rows, (Py_ssize_t)ROWS * h * 4, "rows") ||
        check(cols, (Py_ssize_t)w * VCOLS * 4, "cols"))
        return -1;
    return 0;
}

static PyObject *key_thumb(PyObject *self, PyObject *args) {
    Py_buffer img, rows, cols, out;
    int h, w;
    if (!PyArg_ParseTuple(args, "y*iiy*y*w*", &img, &h, &w, &rows, &cols, &out)) {
        overflow_as_value_error();
        return NULL;
    }
    PyObject *res = NULL;
    if (parse_image(&img, h, w, &rows, &cols) == 0 && check(&out, THUMB * 4, "thumb_out") == 0) {
        uint64_t key = key_of(img.buf, h, w, rows.buf, cols.buf, out.buf);
        res = PyLong_FromUnsignedLongLong(key);
    }
    PyBuffer_Release(&img);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&cols);
    PyBuffer_Release(&out);
    return res;
}

static PyObject *lookup(PyObject *self, PyObject *args) {
    Py_buffer img, rows, cols, keys, thumbs;
    int h, w, radius, min_bits, max_bits;
    Py_ssize_t n;
    double tol;
    if (!PyArg_ParseTuple(args, "y*iiy*y*y*ny*idii", &img, &h, &w, &rows, &cols, &keys, &n,
                          &thumbs, &radius, &tol, &min_bits, &max_bits)) {
        overflow_as_value_error();
        return NULL;
    }
    PyObject *res = NULL;
    if (parse_image(&img, h, w, &rows, &cols) == 0 && check_items(&keys, n, 8, "keys") == 0 &&
        check_items(&thumbs, n, THUMB * 4, "thumbs") == 0) {
        float thumb[THUMB];
        uint64_t key = key_of(img.buf, h, w, rows.buf, cols.buf, thumb);
        int bits = __builtin_popcountll(key);
        Py_ssize_t best = -1;
        int best_d = 65;
        if (bits >= min_bits && bits <= max_bits) {
            const uint64_t *k = keys.buf;
            const float *th = thumbs.buf;
            for (Py_ssize_t i = 0; i < n; i++) {
                int d = __builtin_popcountll(k[i] ^ key);
                if (d > radius || d >= best_d) continue;
                const float *e = th + i * THUMB;
                int alike = 1;
                for (int j = 0; j < THUMB; j++) {
                    if (!(fabsf(e[j] - thumb[j]) <= (float)tol)) { alike = 0; break; }
                }
                if (alike) { best = i; best_d = d; }
            }
        }
        if (best >= 0) res = Py_BuildValue("(ni)", best, best_d);
        else res = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&img);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&cols);
    PyBuffer_Release(&keys);
    PyBuffer_Release(&thumbs);
    return res;
}

static PyMethodDef methods[] = {
    {"key_thumb", key_thumb, METH_VARARGS, "The perceptual key of an image; fills its thumbnail."},
    {"lookup", lookup, METH_VARARGS, "The closest near-copy (index, distance), or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_nearkernel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__nearkernel(void) { return PyModule_Create(&module); }
