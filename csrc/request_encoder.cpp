// SPDX-License-Identifier: Apache-2.0
// The serving request encoder (request_encoder.h): raw values -> ids and dense values, with the
// training encoder's rules (adrec_fast.data.schema.Schema.encode and data/columns.py):
//
// - a categorical value becomes a token: None and "" are missing (id 0); str as is; bool ->
//   "true"/"false"; an integer -> its decimal text; a float -> the text Arrow's float -> string
//   cast gives it (float_text below: shortest round-trip digits, plain notation for decimal
//   exponents -6..9, else "1.5e+10"), float32 values with float32's shortest digits;
// - a token becomes an id: 1 + its position in the owner's vocabulary (0 when unseen), or for a
//   hashed table 1 + fmix64(FNV-1a 64 over salt, 0xff, token) mod (hash_size - 1);
// - a dense value becomes a float64 (None -> missing; text trimmed of Unicode whitespace and
//   parsed as the training reader parses it; "" and "nan" text -> missing), missing -> fill,
//   then sign(x) * log1p(|x|) and (x - mean) / std as the field says, then float32;
// - a behaviour history (list, 1-D array, or text split on the field's sep) drops missing and
//   empty tokens and keeps its last max_len ids.
//
// Every request error is written here, once; each names the field (or column) it concerns.
// The encoder is immutable after construction; encode() holds the GIL (it reads Python
// objects throughout) and keeps no state between calls, so concurrent requests are safe.
#include "request_encoder.h"

#include <pybind11/numpy.h>

#include <algorithm>
#include <charconv>
#include <clocale>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <locale.h>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace adrec {
namespace {

// ------------------------------------------------------------------------------ text rules
constexpr uint64_t kFnvOffset = 0xCBF29CE484222325ULL;
constexpr uint64_t kFnvPrime = 0x100000001B3ULL;

inline uint64_t fnv1a(uint64_t h, std::string_view s) {
  for (unsigned char c : s) h = (h ^ c) * kFnvPrime;
  return h;
}

inline uint64_t fmix64(uint64_t h) {
  h ^= h >> 33;
  h *= 0xFF51AFD7ED558CCDULL;
  h ^= h >> 33;
  h *= 0xC4CEB53FE1BA4E63ULL;
  return h ^ (h >> 33);
}

// Arrow's float -> string cast, which made the training tokens of float columns: the shortest
// digits that read back to the same value (float32 values: float32's), laid out plainly when
// the decimal exponent is in [-6, 10) ("0.000001", "5042", "123456.789") and as d[.ddd]e+-X
// otherwise ("1e-7", "1e+10", "1.5e+15"); "-0", "inf", "-inf", "nan" (any NaN). out: >= 64.
template <class T>
size_t float_text(T v, char* out) {
  if (std::isnan(v)) {
    std::memcpy(out, "nan", 3);
    return 3;
  }
  char* p = out;
  if (std::signbit(v)) {
    *p++ = '-';
    v = -v;
  }
  if (std::isinf(v)) {
    std::memcpy(p, "inf", 3);
    return size_t(p + 3 - out);
  }
  char sci[64];
  const auto r = std::to_chars(sci, sci + sizeof sci, v, std::chars_format::scientific);
  char digits[32];
  int nd = 0;
  const char* q = sci;
  for (; q < r.ptr && *q != 'e'; ++q)
    if (*q != '.') digits[nd++] = *q;
  int exp = 0;
  const char* e = q + 1;
  if (e < r.ptr && *e == '+') ++e;
  std::from_chars(e, r.ptr, exp);
  if (exp >= -6 && exp < 10) {
    const int dp = exp + 1;  // digits before the decimal point
    if (dp <= 0) {
      *p++ = '0';
      *p++ = '.';
      for (int i = 0; i < -dp; ++i) *p++ = '0';
      std::memcpy(p, digits, nd);
      p += nd;
    } else if (dp >= nd) {
      std::memcpy(p, digits, nd);
      p += nd;
      for (int i = nd; i < dp; ++i) *p++ = '0';
    } else {
      std::memcpy(p, digits, dp);
      p += dp;
      *p++ = '.';
      std::memcpy(p, digits + dp, nd - dp);
      p += nd - dp;
    }
  } else {
    *p++ = digits[0];
    if (nd > 1) {
      *p++ = '.';
      std::memcpy(p, digits + 1, nd - 1);
      p += nd - 1;
    }
    *p++ = 'e';
    *p++ = exp < 0 ? '-' : '+';
    p = std::to_chars(p, p + 8, exp < 0 ? -exp : exp).ptr;
  }
  return size_t(p - out);
}

// IEEE half -> double (exact): Arrow casts float16 columns to text through float64.
inline double half_to_double(uint16_t h) {
  const int sign = h >> 15, ex = (h >> 10) & 0x1F, man = h & 0x3FF;
  double v;
  if (ex == 0) v = std::ldexp(double(man), -24);
  else if (ex == 31) v = man ? std::nan("") : INFINITY;
  else v = std::ldexp(double(man | 0x400), ex - 25);
  return sign ? -v : v;
}

// The code points Arrow's utf8_trim_whitespace removes (the same set as Python's str.isspace).
inline bool is_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
         c == 0x202F || c == 0x205F || c == 0x3000;
}

// The code point starting at s[i] (valid UTF-8 assumed) and its length in bytes.
inline uint32_t decode_utf8(std::string_view s, size_t i, size_t* len) {
  const unsigned char c = s[i];
  if (c < 0x80) return *len = 1, c;
  int n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
  if (i + n > s.size()) return *len = 1, c;
  uint32_t cp = c & (0x3F >> (n - 1));
  for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  *len = size_t(n);
  return cp;
}

std::string_view trim_space(std::string_view s) {
  size_t len;
  while (!s.empty() && is_space(decode_utf8(s, 0, &len))) s.remove_prefix(len);
  while (!s.empty()) {
    size_t i = s.size() - 1;
    while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
    if (!is_space(decode_utf8(s, i, &len))) break;
    s.remove_suffix(s.size() - i);
  }
  return s;
}

inline bool ieq(std::string_view a, const char* b) {
  const size_t n = std::strlen(b);
  if (a.size() != n) return false;
  for (size_t i = 0; i < n; ++i)
    if ((a[i] | 0x20) != b[i]) return false;
  return true;
}

// Text of a dense value (already trimmed, non-empty) -> *out; false when it is not a number.
// The grammar is the training reader's (columns._FLOAT_RE): [+-] then digits with an optional
// '.', or '.' digits, with an optional exponent; or inf / infinity / nan in any case.
// strtod_l in the C locale gives the correctly rounded value (+-inf / 0 out of range), as
// Arrow's parser does.
bool parse_number(std::string_view s, double* out) {
  size_t i = 0;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
  const std::string_view body = s.substr(i);
  bool ok = ieq(body, "inf") || ieq(body, "infinity") || ieq(body, "nan");
  if (!ok) {
    auto digit = [&](size_t k) { return k < s.size() && s[k] >= '0' && s[k] <= '9'; };
    size_t nint = 0, nfrac = 0;
    while (digit(i)) ++i, ++nint;
    if (i < s.size() && s[i] == '.') {
      ++i;
      while (digit(i)) ++i, ++nfrac;
    }
    if (nint == 0 && nfrac == 0) return false;
    if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
      ++i;
      if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
      size_t nexp = 0;
      while (digit(i)) ++i, ++nexp;
      if (nexp == 0) return false;
    }
    ok = i == s.size();
  }
  if (!ok) return false;
  static const locale_t c_locale = newlocale(LC_ALL_MASK, "C", locale_t(0));
  char small[64];
  std::string big;
  const char* z;
  if (s.size() < sizeof small) {
    std::memcpy(small, s.data(), s.size());
    small[s.size()] = '\0';
    z = small;
  } else {
    big.assign(s);
    z = big.c_str();
  }
  *out = strtod_l(z, nullptr, c_locale);
  return true;
}

// UCS4 code units (a numpy 'U' item, trailing NULs already dropped) -> UTF-8 in *out;
// false for a code point UTF-8 cannot hold (a lone surrogate).
bool ucs4_to_utf8(const uint32_t* u, size_t n, std::string* out) {
  out->clear();
  for (size_t i = 0; i < n; ++i) {
    const uint32_t c = u[i];
    if (c < 0x80) {
      out->push_back(char(c));
    } else if (c < 0x800) {
      out->push_back(char(0xC0 | (c >> 6)));
      out->push_back(char(0x80 | (c & 0x3F)));
    } else if (c < 0x10000) {
      if (c >= 0xD800 && c < 0xE000) return false;
      out->push_back(char(0xE0 | (c >> 12)));
      out->push_back(char(0x80 | ((c >> 6) & 0x3F)));
      out->push_back(char(0x80 | (c & 0x3F)));
    } else if (c < 0x110000) {
      out->push_back(char(0xF0 | (c >> 18)));
      out->push_back(char(0x80 | ((c >> 12) & 0x3F)));
      out->push_back(char(0x80 | ((c >> 6) & 0x3F)));
      out->push_back(char(0x80 | (c & 0x3F)));
    } else {
      return false;
    }
  }
  return true;
}

std::string short_repr(py::handle o) {
  std::string s = py::repr(o).cast<std::string>();
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

std::string type_name(py::handle o) {
  return py::str(py::type::of(o).attr("__name__")).cast<std::string>();
}

// ------------------------------------------------------------------------------ tables
// A fast 64-bit hash of a token for the vocabulary table (not the training hash: it never
// leaves this process): 8 bytes per multiply, then murmur3's finaliser.
inline uint64_t token_hash(std::string_view s) {
  const char* p = s.data();
  size_t n = s.size();
  uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t(n) * 0xC2B2AE3D27D4EB4FULL);
  for (; n >= 8; p += 8, n -= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    h = (h ^ w) * 0xFF51AFD7ED558CCDULL;
    h ^= h >> 32;
  }
  if (n) {
    uint64_t w = 0;
    std::memcpy(&w, p, n);
    h = (h ^ w) * 0xC4CEB53FE1BA4E63ULL;
  }
  return fmix64(h);
}

// One embedding table's id space: a vocabulary (token -> 1 + position, the first occurrence
// winning as in Arrow's index_in) or the training hash. The vocabulary is an open-addressing
// table at most half full: one probe of a 32-byte slot (hash, key bytes in one arena, id) and
// one compare per lookup in the common case; std::unordered_map took ~2x as long per lookup.
class Table {
 public:
  Table(py::handle vocabulary, const std::string& salt, int64_t hash_size) {
    if (vocabulary.is_none()) {
      hashed_ = true;
      mod_ = uint64_t(hash_size - 1);
      h0_ = fnv1a(kFnvOffset, salt);
      h0_ = (h0_ ^ 0xFFu) * kFnvPrime;
      return;
    }
    std::vector<std::pair<size_t, size_t>> words;  // (arena offset, length)
    for (auto w : vocabulary) {
      const std::string t = w.cast<std::string>();
      words.emplace_back(arena_.size(), t.size());
      arena_ += t;
    }
    int bits = 3;
    while ((size_t(1) << bits) < 2 * words.size()) ++bits;
    slots_.assign(size_t(1) << bits, Slot{});
    mask_ = (size_t(1) << bits) - 1;
    shift_ = 64 - bits;
    for (size_t i = 0; i < words.size(); ++i) {
      const std::string_view key(arena_.data() + words[i].first, words[i].second);
      const uint64_t h = token_hash(key);
      size_t k = size_t(h >> shift_);
      while (slots_[k].id != 0 && !same(slots_[k], h, key)) k = (k + 1) & mask_;
      if (slots_[k].id == 0)
        slots_[k] = Slot{h, uint64_t(words[i].first), uint64_t(words[i].second), int64_t(i) + 1};
    }
  }
  Table(const Table&) = delete;
  Table& operator=(const Table&) = delete;

  // tok: a non-empty token
  int64_t id(std::string_view tok) const {
    if (hashed_) return 1 + int64_t(fmix64(fnv1a(h0_, tok)) % mod_);
    return find(tok, token_hash(tok));
  }

  bool vocabulary() const { return !hashed_; }

  // A vocabulary lookup in steps, for a block of tokens whose cache misses (the slot, then the
  // key's bytes) should overlap: token_hash and prefetch_slot for every token, then
  // prefetch_key, then find. Each step only reads what the one before asked for.
  void prefetch_slot(uint64_t h) const {
    __builtin_prefetch(&slots_[size_t(h >> shift_)]);
  }
  void prefetch_key(uint64_t h) const {
    const Slot& s = slots_[size_t(h >> shift_)];
    if (s.hash == h) __builtin_prefetch(arena_.data() + s.offset);
  }
  int64_t find(std::string_view tok, uint64_t h) const {
    for (size_t k = size_t(h >> shift_);; k = (k + 1) & mask_) {
      const Slot& s = slots_[k];
      if (s.id == 0) return 0;
      if (same(s, h, tok)) return s.id;
    }
  }

 private:
  struct Slot {
    uint64_t hash = 0, offset = 0, size = 0;
    int64_t id = 0;  // 0: empty slot
  };
  bool same(const Slot& s, uint64_t h, std::string_view key) const {
    return s.hash == h && s.size == key.size() &&
           std::memcmp(arena_.data() + s.offset, key.data(), key.size()) == 0;
  }

  bool hashed_ = false;
  uint64_t h0_ = 0, mod_ = 1;
  std::string arena_;  // every vocabulary token, back to back
  std::vector<Slot> slots_;
  size_t mask_ = 0;
  int shift_ = 64;
};

// ------------------------------------------------------------------------------ fields
enum class Kind { kCategorical, kDense, kSequence };

struct Spec {
  Kind kind = Kind::kCategorical;
  std::string where;  // "field 'x'" or "field 'x' (column 'c')": every message's subject
  int column = 0;     // index into the encoder's columns
  int slot = 0;       // bag position / dense position / sequence position
  const Table* table = nullptr;
  // only the vocabulary's values or None (a text field's cached values): any other value raises
  // UnknownValue, and the caller serves the request another way
  bool closed = false;
  double fill = 0, mean = 0, std = 1;
  bool log1p = false, standardize = false;
  float missing_value = 0;  // the transformed fill
  int64_t max_len = 0;
  std::string sep;
};

// How a request gives one column: one user value, a list/tuple, a list of candidate dicts
// (value = dict.get(column)), or a 1-D numpy array read in place.
struct Source {
  enum Mode { kOne, kItems, kDicts, kArray } mode = kOne;
  PyObject* one = nullptr;
  PyObject** items = nullptr;
  PyObject** dicts = nullptr;
  PyObject* key = nullptr;
  // A plain reference keeps an array alive: a default py::array would allocate an empty numpy
  // array for every Source, which several per request made the encoder's largest cost.
  py::object arr;
  int64_t len = 0;  // kArray: its length
  const char* data = nullptr;
  py::ssize_t stride = 0;
  char kind = 0;  // numpy dtype kind
  int itemsize = 0;

  // The value of row i as a borrowed object (kOne, kItems, kDicts, object arrays).
  PyObject* get(int64_t i) const {
    switch (mode) {
      case kOne: return one;
      case kItems: return items[i];
      case kDicts: {
        PyObject* v = PyDict_GetItemWithError(dicts[i], key);
        if (v == nullptr && PyErr_Occurred()) throw py::error_already_set();
        return v ? v : Py_None;
      }
      default: {
        PyObject* v = *reinterpret_cast<PyObject* const*>(data + i * stride);
        return v ? v : Py_None;
      }
    }
  }
  bool objects() const { return mode != kArray || kind == 'O'; }
  const char* at(int64_t i) const { return data + i * stride; }
};

// ------------------------------------------------------------------------------ encoder
class RequestEncoder {
 public:
  RequestEncoder(py::list fields, const std::string& label, bool missing_default)
      : label_(label), missing_default_(missing_default) {
    py::module_ np = py::module_::import("numpy");
    np_bool_ = np.attr("bool_");
    np_integer_ = np.attr("integer");
    np_floating_ = np.attr("floating");
    np_float32_ = np.attr("float32");
    std::unordered_map<int64_t, size_t> table_of;  // table index -> tables_ position
    tables_.reserve(fields.size());
    for (auto item : fields) {
      py::dict d = item.cast<py::dict>();
      Spec s;
      const std::string kind = d["kind"].cast<std::string>();
      const py::str name = d["name"], column = d["column"];
      s.where = "field " + short_repr(name);
      if (!name.equal(column)) s.where += " (column " + short_repr(column) + ")";
      s.slot = d["slot"].cast<int>();
      py::object idx = col_index_.attr("get")(column);
      if (idx.is_none()) {
        idx = py::int_(columns_.size());
        col_index_[column] = idx;
        columns_.push_back(column);
        col_specs_.emplace_back();
      }
      s.column = idx.cast<int>();
      if (kind == "categorical" || kind == "sequence") {
        s.kind = kind == "categorical" ? Kind::kCategorical : Kind::kSequence;
        const int64_t t = d["table"].cast<int64_t>();
        auto it = table_of.find(t);
        if (it == table_of.end()) {
          const int64_t hash_size = d["hash_size"].cast<int64_t>();
          if (d["vocabulary"].is_none() && hash_size < 2)
            throw py::value_error("RequestEncoder: " + s.where + ": hash_size must be >= 2");
          tables_.push_back(std::make_unique<Table>(d["vocabulary"],
                                                    d["salt"].cast<std::string>(), hash_size));
          it = table_of.emplace(t, tables_.size() - 1).first;
        }
        s.table = tables_[it->second].get();
        s.closed = d.contains("closed") && d["closed"].cast<bool>();
        if (s.closed && (s.kind != Kind::kCategorical || d["vocabulary"].is_none()))
          throw py::value_error("RequestEncoder: " + s.where +
                                ": only a categorical field with a vocabulary can be closed");
        if (s.kind == Kind::kSequence) {
          s.max_len = d["max_len"].cast<int64_t>();
          s.sep = d["sep"].cast<std::string>();
          if (s.sep.empty())
            throw py::value_error("RequestEncoder: " + s.where + ": sep must not be empty");
        }
      } else if (kind == "dense") {
        s.kind = Kind::kDense;
        s.fill = d["fill"].cast<double>();
        s.log1p = d["log1p"].cast<bool>();
        s.standardize = !d["mean"].is_none();
        if (s.standardize) {
          s.mean = d["mean"].cast<double>();
          s.std = d["std"].cast<double>();
        }
        s.missing_value = transform(s, s.fill);
      } else {
        throw py::value_error("RequestEncoder: " + s.where + ": unknown kind '" + kind + "'");
      }
      col_specs_[size_t(s.column)].push_back(int(specs_.size()));
      specs_.push_back(std::move(s));
    }
    // positions: slot -> spec, per kind; each kind's slots must be 0..count-1
    for (int k = 0; k < 3; ++k) {
      std::vector<int>& by = k == 0 ? bags_ : k == 1 ? dense_ : seqs_;
      for (size_t i = 0; i < specs_.size(); ++i)
        if (int(specs_[i].kind) == k) by.push_back(int(i));
      std::vector<int> sorted(by.size(), -1);
      for (int i : by) {
        const int slot = specs_[size_t(i)].slot;
        if (slot < 0 || size_t(slot) >= by.size() || sorted[size_t(slot)] != -1)
          throw py::value_error("RequestEncoder: " + specs_[size_t(i)].where + ": slot " +
                                std::to_string(slot) + " is out of place");
        sorted[size_t(slot)] = i;
      }
      by = std::move(sorted);
    }
    py::list names;
    for (auto& c : columns_) names.append(c);
    if (PyList_Sort(names.ptr()) < 0) throw py::error_already_set();
    columns_repr_ = py::repr(names).cast<std::string>();
  }

  void encode_into(py::handle user, py::handle candidates, EncodedBuffers& out) const;
  py::object encode(py::handle user, py::handle candidates) const;

  py::list columns() const {
    py::list out;
    for (auto& c : columns_) out.append(c);
    return out;
  }
  bool missing_default() const { return missing_default_; }

 private:
  // --- the values of one field -------------------------------------------------------
  // isinstance for the numpy scalar types: a C check of the type's MRO, no Python call
  static bool is_a(PyObject* v, const py::object& type) {
    return PyObject_TypeCheck(v, reinterpret_cast<PyTypeObject*>(type.ptr()));
  }
  // Token of one categorical value -> *tok (pointing into the str, or into buf); false when
  // missing. owner keeps a temporary str alive (an int beyond int64).
  bool token_of(const Spec& f, PyObject* v, char* buf, std::string_view* tok,
                py::object* owner) const {
    if (v == Py_None) return false;
    if (PyUnicode_Check(v)) {
      Py_ssize_t n;
      const char* s = PyUnicode_AsUTF8AndSize(v, &n);
      if (s == nullptr) {
        PyErr_Clear();
        throw py::type_error(f.where + ": text " + short_repr(v) + " cannot be encoded as UTF-8");
      }
      *tok = std::string_view(s, size_t(n));
      return n > 0;
    }
    if (PyBool_Check(v) || Py_TYPE(v) == reinterpret_cast<PyTypeObject*>(np_bool_.ptr())) {
      *tok = PyObject_IsTrue(v) ? std::string_view("true") : std::string_view("false");
      return true;
    }
    if (PyFloat_Check(v)) {  // also numpy.float64
      *tok = std::string_view(buf, float_text(PyFloat_AS_DOUBLE(v), buf));
      return true;
    }
    py::object index;
    if (!PyLong_Check(v)) {
      const auto t = reinterpret_cast<PyObject*>(Py_TYPE(v));
      if (t == np_float32_.ptr()) {
        *tok = std::string_view(buf, float_text(float(PyFloat_AsDouble(v)), buf));
        return true;
      }
      if (is_a(v, np_floating_)) {  // float16, longdouble: as float64
        *tok = std::string_view(buf, float_text(PyFloat_AsDouble(v), buf));
        return true;
      }
      if (!is_a(v, np_integer_)) {
        throw py::type_error(f.where + ": expected str, int, float, bool or None, got " +
                             type_name(v) + " (" + short_repr(v) + ")");
      }
      index = py::reinterpret_steal<py::object>(PyNumber_Index(v));
      if (!index) throw py::error_already_set();
      v = index.ptr();
    }
    int overflow = 0;
    const long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (!overflow) {
      *tok = std::string_view(buf, size_t(std::to_chars(buf, buf + 32, x).ptr - buf));
      return true;
    }
    *owner = py::str(v);
    Py_ssize_t n;
    const char* s = PyUnicode_AsUTF8AndSize(owner->ptr(), &n);
    *tok = std::string_view(s, size_t(n));
    return true;
  }

  // Token of row i of a numpy array of a non-object dtype; false when missing.
  bool array_token(const Spec& f, const Source& c, int64_t i, char* buf, std::string* text,
                   std::string_view* tok) const {
    const char* p = c.at(i);
    switch (c.kind) {
      case 'b':
        *tok = *p ? std::string_view("true") : std::string_view("false");
        return true;
      case 'i': {
        int64_t x = c.itemsize == 8 ? *reinterpret_cast<const int64_t*>(p)
                    : c.itemsize == 4 ? *reinterpret_cast<const int32_t*>(p)
                    : c.itemsize == 2 ? *reinterpret_cast<const int16_t*>(p)
                                      : *reinterpret_cast<const int8_t*>(p);
        *tok = std::string_view(buf, size_t(std::to_chars(buf, buf + 32, x).ptr - buf));
        return true;
      }
      case 'u': {
        uint64_t x = c.itemsize == 8 ? *reinterpret_cast<const uint64_t*>(p)
                     : c.itemsize == 4 ? *reinterpret_cast<const uint32_t*>(p)
                     : c.itemsize == 2 ? *reinterpret_cast<const uint16_t*>(p)
                                       : *reinterpret_cast<const uint8_t*>(p);
        *tok = std::string_view(buf, size_t(std::to_chars(buf, buf + 32, x).ptr - buf));
        return true;
      }
      case 'f': {
        size_t n = c.itemsize == 8 ? float_text(*reinterpret_cast<const double*>(p), buf)
                   : c.itemsize == 4
                       ? float_text(*reinterpret_cast<const float*>(p), buf)
                       : float_text(half_to_double(*reinterpret_cast<const uint16_t*>(p)), buf);
        *tok = std::string_view(buf, n);
        return true;
      }
      case 'U': {
        const auto* u = reinterpret_cast<const uint32_t*>(p);
        size_t n = size_t(c.itemsize) / 4;
        while (n > 0 && u[n - 1] == 0) --n;
        if (!ucs4_to_utf8(u, n, text))
          throw py::type_error(f.where + ": text at row " + std::to_string(i) +
                               " cannot be encoded as UTF-8");
        *tok = *text;
        return !text->empty();
      }
      default: {  // 'S': numpy decodes bytes as ASCII when it turns them into text
        size_t n = size_t(c.itemsize);
        while (n > 0 && p[n - 1] == 0) --n;
        for (size_t k = 0; k < n; ++k)
          if (static_cast<unsigned char>(p[k]) >= 0x80)
            throw py::type_error(f.where + ": bytes at row " + std::to_string(i) +
                                 " are not ASCII text");
        *tok = std::string_view(p, n);
        return n > 0;
      }
    }
  }

  [[noreturn]] static void unknown(const Spec& f) {
    throw UnknownValue(f.where + ": a value the served tables do not hold");
  }

  // A closed text field's value: None is missing (false); a non-empty str gives its token
  // (true), which the vocabulary must then hold; anything else is UnknownValue.
  bool closed_token(const Spec& f, PyObject* v, char* buf, std::string_view* tok,
                    py::object* owner) const {
    if (v == Py_None) return false;
    if (!PyUnicode_Check(v) || !token_of(f, v, buf, tok, owner)) unknown(f);
    return true;
  }

  // encode_ids for a vocabulary and a column of objects, kBlock rows at a time: every row's
  // token and hash first, then the table's slots, then its keys, so that the misses of a block
  // (the value objects, their slots, the keys' bytes: after the request's weights went through
  // the caches, each comes from L3) overlap instead of each stalling the next lookup.
  void encode_block_ids(const Spec& f, const Source& c, int64_t n, int64_t* out,
                        int64_t stride) const {
    constexpr int64_t kBlock = 16;
    char buf[kBlock][64];
    std::string_view tok[kBlock];
    uint64_t h[kBlock];
    bool ok[kBlock];
    py::object owner[kBlock];
    const Table& t = *f.table;
    for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
      const int64_t m = std::min(kBlock, n - i0);
      for (int64_t j = 0; j < m; ++j) {
        PyObject* v = c.get(i0 + j);
        ok[j] = f.closed ? closed_token(f, v, buf[j], &tok[j], &owner[j])
                         : token_of(f, v, buf[j], &tok[j], &owner[j]);
        if (!ok[j]) continue;
        h[j] = token_hash(tok[j]);
        t.prefetch_slot(h[j]);
      }
      for (int64_t j = 0; j < m; ++j)
        if (ok[j]) t.prefetch_key(h[j]);
      for (int64_t j = 0; j < m; ++j) {
        const int64_t id = ok[j] ? t.find(tok[j], h[j]) : 0;
        if (f.closed && ok[j] && id == 0) unknown(f);
        out[(i0 + j) * stride] = id;
      }
    }
  }

  // Categorical ids of rows [0, n) of c -> out[i * stride].
  void encode_ids(const Spec& f, const Source& c, int64_t n, int64_t* out,
                  int64_t stride) const {
    char buf[64];
    std::string text;
    std::string_view tok;
    py::object owner;
    const Table& t = *f.table;
    if (t.vocabulary() && c.objects() && n > 1) return encode_block_ids(f, c, n, out, stride);
    if (f.closed) {  // None, or text the vocabulary holds
      for (int64_t i = 0; i < n; ++i) {
        bool ok;
        if (c.objects()) {
          ok = closed_token(f, c.get(i), buf, &tok, &owner);
        } else {  // a numpy str array holds no None: only its empty strings are not text
          ok = c.kind == 'U' && array_token(f, c, i, buf, &text, &tok);
          if (!ok) unknown(f);
        }
        const int64_t id = ok ? t.id(tok) : 0;
        if (ok && id == 0) unknown(f);
        out[i * stride] = id;
      }
      return;
    }
    for (int64_t i = 0; i < n; ++i) {
      const bool ok = c.objects() ? token_of(f, c.get(i), buf, &tok, &owner)
                                  : array_token(f, c, i, buf, &text, &tok);
      out[i * stride] = ok ? t.id(tok) : 0;
    }
  }

  float transform(const Spec& f, double x) const {
    if (f.log1p) {
      const double s = x > 0 ? 1.0 : x < 0 ? -1.0 : x == 0 ? 0.0 : x;  // numpy.sign
      x = s * std::log1p(std::fabs(x));
    }
    if (f.standardize) x = (x - f.mean) / f.std;
    return float(x);
  }

  // Dense text -> its value, NaN when missing ("", "nan"); TypeError when not a number.
  double text_value(const Spec& f, std::string_view s) const {
    s = trim_space(s);
    if (s.empty()) return std::nan("");
    double x;
    if (!parse_number(s, &x))
      throw py::type_error(f.where + ": non-numeric text '" + std::string(s.substr(0, 60)) +
                           "' for a dense field (numbers, numeric text or None)");
    return x;
  }

  [[noreturn]] void nan_error(const Spec& f) const {
    throw py::value_error(f.where + ": NaN dense value (pass None for a missing value)");
  }

  // One dense value as an object -> raw float64, NaN = missing.
  double object_value(const Spec& f, PyObject* v) const {
    if (v == Py_None) return std::nan("");
    double x;
    if (PyFloat_Check(v)) {
      x = PyFloat_AS_DOUBLE(v);
    } else if (PyUnicode_Check(v)) {
      Py_ssize_t n;
      const char* s = PyUnicode_AsUTF8AndSize(v, &n);
      if (s == nullptr) {
        PyErr_Clear();
        throw py::type_error(f.where + ": text " + short_repr(v) + " cannot be encoded as UTF-8");
      }
      return text_value(f, std::string_view(s, size_t(n)));
    } else if (PyBool_Check(v) || Py_TYPE(v) == reinterpret_cast<PyTypeObject*>(np_bool_.ptr())) {
      x = PyObject_IsTrue(v) ? 1.0 : 0.0;
    } else if (PyLong_Check(v) || is_a(v, np_integer_)) {
      py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(v));
      if (!index) throw py::error_already_set();
      x = PyLong_AsDouble(index.ptr());
      if (x == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        throw py::value_error(f.where + ": the integer " + short_repr(v) +
                              " is too large for a float");
      }
    } else if (is_a(v, np_floating_)) {
      x = PyFloat_AsDouble(v);
    } else {
      throw py::type_error(f.where + ": expected a number, numeric text or None, got " +
                           type_name(v) + " (" + short_repr(v) + ")");
    }
    if (std::isnan(x)) nan_error(f);
    return x;
  }

  double array_value(const Spec& f, const Source& c, int64_t i, std::string* text) const {
    const char* p = c.at(i);
    switch (c.kind) {
      case 'b': return *p ? 1.0 : 0.0;
      case 'i':
        return c.itemsize == 8 ? double(*reinterpret_cast<const int64_t*>(p))
               : c.itemsize == 4 ? double(*reinterpret_cast<const int32_t*>(p))
               : c.itemsize == 2 ? double(*reinterpret_cast<const int16_t*>(p))
                                 : double(*reinterpret_cast<const int8_t*>(p));
      case 'u':
        return c.itemsize == 8 ? double(*reinterpret_cast<const uint64_t*>(p))
               : c.itemsize == 4 ? double(*reinterpret_cast<const uint32_t*>(p))
               : c.itemsize == 2 ? double(*reinterpret_cast<const uint16_t*>(p))
                                 : double(*reinterpret_cast<const uint8_t*>(p));
      case 'f': {
        const double x = c.itemsize == 8 ? *reinterpret_cast<const double*>(p)
                         : c.itemsize == 4 ? double(*reinterpret_cast<const float*>(p))
                                           : half_to_double(*reinterpret_cast<const uint16_t*>(p));
        if (std::isnan(x)) nan_error(f);
        return x;
      }
      default: {  // 'U', 'S'
        std::string_view tok;
        char buf[8];
        if (!array_token(f, c, i, buf, text, &tok)) return std::nan("");
        return text_value(f, tok);
      }
    }
  }

  // Dense values of rows [0, n) of c -> out[i * stride], transformed.
  void encode_dense(const Spec& f, const Source& c, int64_t n, float* out, int64_t stride) const {
    std::string text;
    for (int64_t i = 0; i < n; ++i) {
      const double x = c.objects() ? object_value(f, c.get(i)) : array_value(f, c, i, &text);
      out[i * stride] = std::isnan(x) ? f.missing_value : transform(f, x);
    }
  }

  // A behaviour history (one user value) -> its ids, the last max_len kept.
  // The history v's ids, the last max_len kept, appended to out; returns how many.
  int64_t encode_sequence(const Spec& f, PyObject* v, std::vector<int64_t>& out) const {
    std::vector<int64_t>& ids = seq_scratch();
    ids.clear();
    char buf[64];
    std::string_view tok;
    py::object owner;
    auto add = [&](std::string_view t) { ids.push_back(f.table->id(t)); };
    if (v == Py_None) {
    } else if (PyList_Check(v) || PyTuple_Check(v) || py::isinstance<py::array>(v)) {
      Source c;
      int64_t n;
      if (py::isinstance<py::array>(v)) {
        c = array_source(f, py::reinterpret_borrow<py::array>(v), "a history");
        n = c.len;
      } else {
        c.mode = Source::kItems;
        c.items = PySequence_Fast_ITEMS(v);
        n = PySequence_Fast_GET_SIZE(v);
      }
      std::string text;
      for (int64_t i = 0; i < n; ++i) {
        const bool ok = c.objects() ? token_of(f, c.get(i), buf, &tok, &owner)
                                    : array_token(f, c, i, buf, &text, &tok);
        if (ok) add(tok);
      }
    } else {
      // a scalar: its token split on sep, as the training reader splits text histories
      if (!PyUnicode_Check(v) && !PyLong_Check(v) && !PyFloat_Check(v) &&
          !is_a(v, np_integer_) &&
          !is_a(v, np_floating_) &&
          Py_TYPE(v) != reinterpret_cast<PyTypeObject*>(np_bool_.ptr())) {
        throw py::type_error(f.where + ": a history must be a list, a 1-D array, text or None, "
                             "got " + type_name(v) + " (" + short_repr(v) + ")");
      }
      if (token_of(f, v, buf, &tok, &owner)) {
        size_t start = 0;
        while (true) {
          const size_t end = tok.find(f.sep, start);
          const std::string_view piece =
              tok.substr(start, end == tok.npos ? tok.npos : end - start);
          if (!piece.empty()) add(piece);
          if (end == tok.npos) break;
          start = end + f.sep.size();
        }
      }
    }
    const size_t keep = f.max_len > 0 ? std::min(ids.size(), size_t(f.max_len)) : ids.size();
    out.insert(out.end(), ids.end() - keep, ids.end());
    return int64_t(keep);
  }
  static std::vector<int64_t>& seq_scratch() {
    thread_local std::vector<int64_t> v;
    return v;
  }

  // --- request structure -------------------------------------------------------------
  // A numpy array as a column: 1-D, a supported dtype, native byte order.
  Source array_source(const Spec& f, py::array a, const char* what) const {
    if (a.ndim() != 1) {
      std::string shape = "(";
      for (py::ssize_t k = 0; k < a.ndim(); ++k)
        shape += (k ? ", " : "") + std::to_string(a.shape(k));
      throw py::value_error(f.where + ": " + what + " must be 1-D, got an array of shape " +
                            shape + ")");
    }
    const char kind = a.dtype().kind();
    const int size = int(a.dtype().itemsize());
    const bool ok = kind == 'b' || kind == 'O' || kind == 'U' || kind == 'S' ||
                    ((kind == 'i' || kind == 'u') && (size == 1 || size == 2 || size == 4 ||
                                                      size == 8)) ||
                    (kind == 'f' && (size == 2 || size == 4 || size == 8));
    if (!ok)
      throw py::type_error(f.where + ": " + what + " of dtype " +
                           py::str(a.dtype()).cast<std::string>() +
                           " (bool, int, float, str or object arrays)");
    if (a.dtype().byteorder() == '>' || (a.dtype().byteorder() == '<' && !little_endian()))
      a = py::reinterpret_steal<py::array>(
          PyObject_CallMethod(a.ptr(), "astype", "O",
                              a.dtype().attr("newbyteorder")("=").ptr()));
    Source c;
    c.mode = Source::kArray;
    c.arr = a;
    c.len = a.shape(0);
    c.data = static_cast<const char*>(a.data());
    c.stride = a.strides(0);
    c.kind = kind;
    c.itemsize = size;
    return c;
  }
  static bool little_endian() {
    const uint16_t x = 1;
    return *reinterpret_cast<const uint8_t*>(&x) == 1;
  }

  // The first spec of a column (its messages' subject).
  const Spec& first_spec(int col) const { return specs_[size_t(col_specs_[size_t(col)][0])]; }

  std::string names_of(const std::vector<PyObject*>& keys) const {
    std::string s;
    for (size_t i = 0; i < keys.size(); ++i) s += (i ? ", " : "") + short_repr(keys[i]);
    return s;
  }

  py::str label_;
  bool missing_default_;
  py::dict col_index_;  // column name -> index into columns_
  std::vector<py::str> columns_;
  std::vector<std::vector<int>> col_specs_;  // column -> its specs
  std::vector<Spec> specs_;
  std::vector<std::unique_ptr<Table>> tables_;
  std::vector<int> bags_, dense_, seqs_;  // position -> spec index
  std::string columns_repr_;
  py::object np_bool_, np_integer_, np_floating_, np_float32_;
};

// EncodedRequest: a C struct sequence (a named tuple built without Python code).
PyTypeObject* encoded_request_type = nullptr;
PyStructSequence_Field encoded_fields[] = {
    {"n", "number of candidates N (>= 1)"},
    {"cand_slots", "tuple of the bag positions given per candidate, ascending"},
    {"user_ids", "int64 [T] ids in bag order; 0 at candidate slots"},
    {"cand_ids", "int64 [N, Tc] ids of the candidate slots, C-contiguous"},
    {"dense", "float32 [Nd, Kd] transformed dense values; Nd = 1 unless dense_cand"},
    {"dense_cand", "tuple of the dense positions given per candidate, ascending"},
    {"seqs", "list of int64 [L] histories, one per sequence field"},
    {nullptr, nullptr}};
PyStructSequence_Desc encoded_desc = {
    "adrec_fast._C.EncodedRequest",
    "One request encoded as training encodes it (adrec_fast.serving.encoder).", encoded_fields,
    7};

void RequestEncoder::encode_into(py::handle user, py::handle candidates,
                                 EncodedBuffers& out) const {
  if (!PyDict_Check(user.ptr()))
    throw py::type_error("user must be a dict of column -> value, got " + type_name(user));
  // candidates: a dict of columns, or a list/tuple of dicts (keys in first-seen order)
  const bool as_dicts = PyList_Check(candidates.ptr()) || PyTuple_Check(candidates.ptr());
  std::vector<PyObject*> ckeys, cvals;  // column names (and, for a dict, the columns)
  PyObject** dicts = nullptr;
  int64_t n = -1;
  if (PyDict_Check(candidates.ptr())) {
    if (PyDict_Size(candidates.ptr()) == 0)
      throw py::value_error("empty candidates: no candidate columns");
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(candidates.ptr(), &pos, &k, &v)) ckeys.push_back(k), cvals.push_back(v);
  } else if (as_dicts) {
    n = PySequence_Fast_GET_SIZE(candidates.ptr());
    if (n == 0) throw py::value_error("empty candidate list");
    dicts = PySequence_Fast_ITEMS(candidates.ptr());
    py::dict seen;
    for (int64_t i = 0; i < n; ++i) {
      if (!PyDict_Check(dicts[i]))
        throw py::type_error("candidate " + std::to_string(i) + " must be a dict, got " +
                             type_name(dicts[i]));
      PyObject *k, *v;
      Py_ssize_t pos = 0;
      while (PyDict_Next(dicts[i], &pos, &k, &v)) {
        const int known = PyDict_Contains(seen.ptr(), k);
        if (known < 0 || (!known && PyDict_SetItem(seen.ptr(), k, Py_None) < 0))
          throw py::error_already_set();
        if (!known) ckeys.push_back(k);
      }
    }
  } else {
    throw py::type_error("candidates must be a dict of columns or a list of dicts, got " +
                         type_name(candidates));
  }
  // which column each side gives; unknown names first, then names on both sides
  const size_t C = columns_.size();
  std::vector<int8_t> side(C, 0);  // 0 neither, 1 user, 2 candidates
  std::vector<int> ucols, ccols;
  std::vector<PyObject*> uvals, unknown, both;
  auto col_of = [&](PyObject* key) {
    PyObject* i = PyDict_GetItemWithError(col_index_.ptr(), key);
    if (i == nullptr && PyErr_Occurred()) throw py::error_already_set();
    return i ? int(PyLong_AsLong(i)) : -1;
  };
  {
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (PyDict_Next(user.ptr(), &pos, &k, &v)) {
      const int c = col_of(k);
      if (c < 0) {
        unknown.push_back(k);
        continue;
      }
      side[size_t(c)] = 1;
      ucols.push_back(c);
      uvals.push_back(v);
    }
  }
  for (PyObject* k : ckeys) {
    const int c = col_of(k);
    if (c < 0) unknown.push_back(k);
    else if (side[size_t(c)] == 1) both.push_back(k);
    ccols.push_back(c);
  }
  if (!unknown.empty()) {
    std::string msg = std::string("unknown field") + (unknown.size() > 1 ? "s " : " ") +
                      names_of(unknown) + "; the schema's fields are " + columns_repr_;
    for (PyObject* k : unknown)
      if (PyObject_RichCompareBool(k, label_.ptr(), Py_EQ) == 1)
        msg += " (" + short_repr(k) + " is the label column, not a feature)";
    PyErr_Clear();  // a key that cannot be compared with the label is just unknown
    throw py::value_error(msg);
  }
  if (!both.empty()) {
    py::list b;
    for (PyObject* k : both) b.append(py::reinterpret_borrow<py::object>(k));
    if (PyList_Sort(b.ptr()) < 0) PyErr_Clear();  // names of mixed types stay unsorted
    throw py::value_error("fields given both for the user and per candidate: " + short_repr(b));
  }
  for (size_t j = 0; j < ccols.size(); ++j) {
    side[size_t(ccols[j])] = 2;
    for (int si : col_specs_[size_t(ccols[j])])
      if (specs_[size_t(si)].kind == Kind::kSequence)
        throw py::value_error(specs_[size_t(si)].where + " is a behaviour history: give it once "
                              "in user, not per candidate");
  }
  // candidate columns: their sources and one length
  std::vector<Source> csrc(ccols.size());
  for (size_t j = 0; j < ccols.size(); ++j) {
    Source& c = csrc[j];
    const Spec& f = first_spec(ccols[j]);
    if (as_dicts) {
      c.mode = Source::kDicts;
      c.dicts = dicts;
      c.key = ckeys[j];
      continue;
    }
    PyObject* col = cvals[j];
    int64_t m;
    if (PyList_Check(col) || PyTuple_Check(col)) {
      c.mode = Source::kItems;
      c.items = PySequence_Fast_ITEMS(col);
      m = PySequence_Fast_GET_SIZE(col);
    } else if (py::isinstance<py::array>(col)) {
      c = array_source(f, py::reinterpret_borrow<py::array>(col), "a candidate column");
      m = c.len;
    } else {
      throw py::type_error(f.where + ": a candidate column must be a list or 1-D array, got " +
                           type_name(col));
    }
    if (n < 0) n = m;
    if (m != n)
      throw py::value_error("candidate column " + short_repr(ckeys[j]) + " has " +
                            std::to_string(m) + " values, expected " + std::to_string(n));
  }
  if (n == 0) throw py::value_error("empty candidate list");
  if (!missing_default_) {
    std::vector<PyObject*> missing;
    for (size_t c = 0; c < C; ++c)
      if (side[c] == 0) missing.push_back(columns_[c].ptr());
    if (!missing.empty())
      throw py::value_error(std::string("missing field") + (missing.size() > 1 ? "s " : " ") +
                            names_of(missing) +
                            ": give each in user or per candidate (None is a missing value), or "
                            "build with missing='default' to fill absent fields with their "
                            "training defaults");
  }
  // outputs
  const int64_t T = int64_t(bags_.size()), Kd = int64_t(dense_.size());
  int64_t Tc = 0;
  std::vector<int> ccol_of(C, -1);  // column -> its position in ccols
  for (size_t j = 0; j < ccols.size(); ++j) ccol_of[size_t(ccols[j])] = int(j);
  out.n = n;
  out.cand_slots.clear();
  out.dense_cand.clear();
  for (int64_t t = 0; t < T; ++t)
    if (side[size_t(specs_[size_t(bags_[size_t(t)])].column)] == 2) out.cand_slots.push_back(t);
  for (int64_t j = 0; j < Kd; ++j)
    if (side[size_t(specs_[size_t(dense_[size_t(j)])].column)] == 2) out.dense_cand.push_back(j);
  Tc = int64_t(out.cand_slots.size());
  const int64_t Nd = out.dense_cand.empty() ? 1 : n;
  out.user_ids.assign(size_t(T), 0);
  out.cand_ids.resize(size_t(n * Tc));
  out.dense.resize(size_t(Nd * Kd));
  out.Nd = Nd;
  int64_t* uid = out.user_ids.data();
  int64_t* cid = out.cand_ids.data();
  float* dv = out.dense.data();
  // user values, one per column
  std::vector<PyObject*> uval(C, nullptr);
  for (size_t j = 0; j < ucols.size(); ++j) uval[size_t(ucols[j])] = uvals[j];
  Source one;
  for (int64_t t = 0, c = 0; t < T; ++t) {
    const Spec& f = specs_[size_t(bags_[size_t(t)])];
    const int8_t s = side[size_t(f.column)];
    if (s == 2) {
      encode_ids(f, csrc[size_t(ccol_of[size_t(f.column)])], n, cid + c, Tc);
      ++c;
    } else if (s == 1) {
      one.one = uval[size_t(f.column)];
      encode_ids(f, one, 1, uid + t, 1);
    }
  }
  for (int64_t j = 0; j < Kd; ++j) {
    const Spec& f = specs_[size_t(dense_[size_t(j)])];
    const int8_t s = side[size_t(f.column)];
    if (s == 2) {
      encode_dense(f, csrc[size_t(ccol_of[size_t(f.column)])], n, dv + j, Kd);
      continue;
    }
    float x = f.missing_value;
    if (s == 1) {
      one.one = uval[size_t(f.column)];
      encode_dense(f, one, 1, &x, 1);
    }
    for (int64_t r = 0; r < Nd; ++r) dv[r * Kd + j] = x;
  }
  out.seq_ids.clear();
  out.seq_lengths.clear();
  for (size_t k = 0; k < seqs_.size(); ++k) {
    const Spec& f = specs_[size_t(seqs_[k])];
    out.seq_lengths.push_back(encode_sequence(
        f, side[size_t(f.column)] == 1 ? uval[size_t(f.column)] : Py_None, out.seq_ids));
  }
}

template <class T>
py::array_t<T> to_numpy(const std::vector<T>& v, std::vector<py::ssize_t> shape) {
  py::array_t<T> a(shape);
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
  return a;
}

py::tuple to_tuple(const std::vector<int64_t>& v) {
  py::tuple t(v.size());
  for (size_t i = 0; i < v.size(); ++i) t[i] = py::int_(v[i]);
  return t;
}

py::object RequestEncoder::encode(py::handle user, py::handle candidates) const {
  EncodedBuffers b;
  encode_into(user, candidates, b);
  const py::ssize_t n = b.n, Tc = py::ssize_t(b.cand_slots.size());
  const py::ssize_t Kd = py::ssize_t(dense_.size());
  py::list seqs(b.seq_lengths.size());
  for (size_t k = 0, off = 0; k < b.seq_lengths.size(); off += size_t(b.seq_lengths[k]), ++k) {
    py::array_t<int64_t> a(b.seq_lengths[k]);
    if (b.seq_lengths[k]) std::memcpy(a.mutable_data(), b.seq_ids.data() + off, size_t(b.seq_lengths[k]) * 8);
    seqs[k] = a;
  }
  PyObject* out = PyStructSequence_New(encoded_request_type);
  if (!out) throw py::error_already_set();
  PyStructSequence_SetItem(out, 0, py::int_(n).release().ptr());
  PyStructSequence_SetItem(out, 1, to_tuple(b.cand_slots).release().ptr());
  PyStructSequence_SetItem(out, 2, to_numpy(b.user_ids, {py::ssize_t(b.user_ids.size())}).release().ptr());
  PyStructSequence_SetItem(out, 3, to_numpy(b.cand_ids, {n, Tc}).release().ptr());
  PyStructSequence_SetItem(out, 4, to_numpy(b.dense, {py::ssize_t(b.Nd), Kd}).release().ptr());
  PyStructSequence_SetItem(out, 5, to_tuple(b.dense_cand).release().ptr());
  PyStructSequence_SetItem(out, 6, seqs.release().ptr());
  return py::reinterpret_steal<py::object>(out);
}

}  // namespace

void encode_request(py::handle encoder, py::handle user, py::handle candidates,
                    EncodedBuffers& out) {
  encoder.cast<const RequestEncoder&>().encode_into(user, candidates, out);
}

void bind_request_encoder(py::module_& m) {
  encoded_request_type = PyStructSequence_NewType(&encoded_desc);
  if (!encoded_request_type) throw py::error_already_set();
  m.add_object("EncodedRequest", py::reinterpret_borrow<py::object>(
                                     reinterpret_cast<PyObject*>(encoded_request_type)));
  py::register_exception<UnknownValue>(m, "UnknownValue", PyExc_KeyError);
  py::class_<RequestEncoder>(m, "RequestEncoder",
                             "Raw request values -> ids and dense values as training encodes "
                             "them; built by adrec_fast.serving.encoder.RequestEncoder.")
      .def(py::init<py::list, const std::string&, bool>(), py::arg("fields"), py::arg("label"),
           py::arg("missing_default"))
      .def("encode", &RequestEncoder::encode, py::arg("user"), py::arg("candidates"))
      .def_property_readonly("columns", &RequestEncoder::columns)
      .def_property_readonly("missing_default", &RequestEncoder::missing_default);
}

}  // namespace adrec
