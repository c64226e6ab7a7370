#include "trainer/checkpoint.h"

#include <dirent.h>
#include <fcntl.h>
#include <hdf5.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <thread>

#include "trainer/checkpoint_sharded.h"

namespace dsa {

namespace {

[[noreturn]] void ck_fail(const std::string& path, const std::string& msg) { fail("[checkpoint] " + path + ": " + msg); }

// HDF5 prints its own error stack by default; errors here are reported once, as exceptions.
void quiet_hdf5() {
  static bool done = [] {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    return true;
  }();
  (void)done;
}

// Owns one HDF5 identifier.
struct Hid {
  hid_t id = -1;
  herr_t (*close)(hid_t) = nullptr;
  Hid(hid_t i, herr_t (*c)(hid_t)) : id(i), close(c) {}
  Hid(const Hid&) = delete;
  Hid& operator=(const Hid&) = delete;
  ~Hid() {
    if (id >= 0 && close) close(id);
  }
  operator hid_t() const { return id; }
  bool ok() const { return id >= 0; }
};

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

// ---- writing helpers ----

hid_t h5_type_of(DType t) {
  switch (t) {
    case DType::F32: return H5T_IEEE_F32LE;
    case DType::F64: return H5T_IEEE_F64LE;
    case DType::BF16: return H5T_STD_U16LE;
    case DType::F8E4M3: return H5T_STD_U8LE;
    case DType::I32: return H5T_STD_I32LE;
    case DType::I64: return H5T_STD_I64LE;
    case DType::U8: return H5T_STD_U8LE;
  }
  return H5T_STD_U8LE;
}
hid_t h5_native_of(DType t) {
  switch (t) {
    case DType::F32: return H5T_NATIVE_FLOAT;
    case DType::F64: return H5T_NATIVE_DOUBLE;
    case DType::BF16: return H5T_NATIVE_UINT16;
    case DType::F8E4M3: return H5T_NATIVE_UINT8;
    case DType::I32: return H5T_NATIVE_INT32;
    case DType::I64: return H5T_NATIVE_INT64;
    case DType::U8: return H5T_NATIVE_UINT8;
  }
  return H5T_NATIVE_UINT8;
}
bool dtype_from_name(const std::string& s, DType* out) {
  for (DType t : {DType::F32, DType::F64, DType::BF16, DType::F8E4M3, DType::I32, DType::I64, DType::U8})
    if (s == dtype_name(t)) {
      *out = t;
      return true;
    }
  return false;
}

Hid vlen_str_type() {
  Hid t(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(t, H5T_VARIABLE);
  H5Tset_cset(t, H5T_CSET_UTF8);
  return Hid(H5Tcopy(t), H5Tclose);
}

void write_str_attr(hid_t obj, const char* name, const std::string& v, const std::string& path) {
  Hid t = vlen_str_type();
  Hid sp(H5Screate(H5S_SCALAR), H5Sclose);
  Hid a(H5Acreate2(obj, name, t, sp, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  const char* p = v.c_str();
  if (!a.ok() || H5Awrite(a, t, &p) < 0) ck_fail(path, std::string("cannot write attribute ") + name);
}

void write_i64_attr(hid_t obj, const char* name, int64_t v, const std::string& path) {
  Hid sp(H5Screate(H5S_SCALAR), H5Sclose);
  Hid a(H5Acreate2(obj, name, H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  if (!a.ok() || H5Awrite(a, H5T_NATIVE_INT64, &v) < 0) ck_fail(path, std::string("cannot write attribute ") + name);
}

void write_u64_attr(hid_t obj, const char* name, uint64_t v, const std::string& path) {
  Hid sp(H5Screate(H5S_SCALAR), H5Sclose);
  Hid a(H5Acreate2(obj, name, H5T_STD_U64LE, sp, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  if (!a.ok() || H5Awrite(a, H5T_NATIVE_UINT64, &v) < 0) ck_fail(path, std::string("cannot write attribute ") + name);
}

void write_strings(hid_t file, const char* name, const std::vector<std::string>& v, bool scalar, const std::string& path) {
  Hid t = vlen_str_type();
  hsize_t n = v.size();
  Hid sp(scalar ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, &n, nullptr), H5Sclose);
  Hid lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
  H5Pset_create_intermediate_group(lcpl, 1);
  Hid d(H5Dcreate2(file, name, t, sp, lcpl, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
  std::vector<const char*> ptrs;
  for (const std::string& s : v) ptrs.push_back(s.c_str());
  if (!d.ok() || (!ptrs.empty() && H5Dwrite(d, t, H5S_ALL, H5S_ALL, H5P_DEFAULT, ptrs.data()) < 0))
    ck_fail(path, std::string("cannot write dataset ") + name);
}

// Test hook: DSA_CKPT_SAVE_DELAY_MS sleeps after every tensor, so a test can kill a save midway.
void save_delay() {
  const char* e = std::getenv("DSA_CKPT_SAVE_DELAY_MS");  // read every time: a forked child may set it
  const int ms = e ? std::atoi(e) : 0;
  if (ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(ms));
}

void write_tensor(hid_t file, const std::string& dname, const Tensor& t_in, const char* group, const std::string& path) {
  const Tensor t = t_in.is_cpu() ? t_in : t_in.to(Device::CPU);
  std::vector<hsize_t> dims(t.shape().begin(), t.shape().end());
  Hid sp(dims.empty() ? H5Screate(H5S_SCALAR) : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr),
         H5Sclose);
  Hid lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
  H5Pset_create_intermediate_group(lcpl, 1);
  Hid d(H5Dcreate2(file, dname.c_str(), h5_type_of(t.dtype()), sp, lcpl, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
  if (!d.ok()) ck_fail(path, "cannot create dataset " + dname);
  if (t.numel() > 0 && H5Dwrite(d, h5_native_of(t.dtype()), H5S_ALL, H5S_ALL, H5P_DEFAULT, t.raw()) < 0)
    ck_fail(path, "cannot write dataset " + dname);
  write_str_attr(d, "dtype", dtype_name(t.dtype()), path);
  if (group) write_str_attr(d, "group", group, path);
  save_delay();
}

void check_extra_key(const std::string& key, const std::string& path) {
  bool ok = !key.empty() && key[0] != '/' && key.back() != '/' && key.rfind("params/", 0) != 0 &&
            key.rfind("meta/", 0) != 0 && key != "params" && key != "meta";
  std::stringstream ss(key);
  for (std::string part; ok && std::getline(ss, part, '/');) ok = !part.empty() && part != "." && part != "..";
  if (!ok) ck_fail(path, "bad extra tensor key '" + key + "'");
}

void fsync_path(const std::string& p, bool dir) {
  const int fd = ::open(p.c_str(), (dir ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) ck_fail(p, std::string("cannot open for fsync: ") + std::strerror(errno));
  const int r = ::fsync(fd);
  ::close(fd);
  if (r != 0 && !dir) ck_fail(p, std::string("fsync failed: ") + std::strerror(errno));
}

std::string dir_of(const std::string& p) {
  const size_t s = p.find_last_of('/');
  return s == std::string::npos ? "." : (s == 0 ? "/" : p.substr(0, s));
}

bool is_dir(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

void mkdirs(const std::string& p) {
  if (p.empty() || is_dir(p)) return;
  mkdirs(dir_of(p));
  if (::mkdir(p.c_str(), 0755) != 0 && errno != EEXIST) ck_fail(p, std::string("cannot create directory: ") + std::strerror(errno));
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d)) out.push_back(e->d_name);
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

// "ckpt-<digits>.h5" (a file) or "ckpt-<digits>" (a sharded directory) -> step, else -1.
int64_t step_of_name(const std::string& f) {
  if (f.rfind("ckpt-", 0) != 0) return -1;
  const std::string d = ends_with(f, ".h5") ? f.substr(5, f.size() - 8) : f.substr(5);
  if (d.empty() || d.size() > 18 || d.find_first_not_of("0123456789") != std::string::npos) return -1;
  return std::stoll(d);
}

// ---- reading helpers ----

std::string read_str(hid_t obj, bool is_attr, const std::string& what, const std::string& path) {
  Hid t(is_attr ? H5Aget_type(obj) : H5Dget_type(obj), H5Tclose);
  if (!t.ok() || H5Tget_class(t) != H5T_STRING) ck_fail(path, what + " must be a string");
  if (H5Tis_variable_str(t) > 0) {
    Hid mt = vlen_str_type();
    char* p = nullptr;
    const herr_t r = is_attr ? H5Aread(obj, mt, &p) : H5Dread(obj, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, &p);
    if (r < 0) ck_fail(path, "cannot read " + what);
    std::string s = p ? p : "";
    if (p) H5free_memory(p);
    return s;
  }
  const size_t n = H5Tget_size(t);
  if (n == 0 || n > (64u << 20)) ck_fail(path, what + " has an unreasonable string size");
  std::vector<char> buf(n + 1, 0);
  Hid mt(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(mt, n);
  const herr_t r = is_attr ? H5Aread(obj, mt, buf.data()) : H5Dread(obj, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data());
  if (r < 0) ck_fail(path, "cannot read " + what);
  return std::string(buf.data());
}

std::string str_attr(hid_t obj, const char* name, const std::string& where, const std::string& path) {
  if (H5Aexists(obj, name) <= 0) ck_fail(path, where + ": missing attribute '" + name + "'");
  Hid a(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose);
  return read_str(a, true, where + " attribute '" + name + "'", path);
}

template <class T>
T num_attr(hid_t obj, const char* name, const std::string& path) {
  if (H5Aexists(obj, name) <= 0) ck_fail(path, std::string("missing attribute '") + name + "'");
  Hid a(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose);
  Hid sp(H5Aget_space(a), H5Sclose);
  Hid t(H5Aget_type(a), H5Tclose);
  if (H5Sget_simple_extent_npoints(sp) != 1 || H5Tget_class(t) != H5T_INTEGER)
    ck_fail(path, std::string("attribute '") + name + "' must be one integer");
  T v{};
  if (H5Aread(a, std::is_signed<T>::value ? H5T_NATIVE_INT64 : H5T_NATIVE_UINT64, &v) < 0)
    ck_fail(path, std::string("cannot read attribute '") + name + "'");
  return v;
}

bool link_exists(hid_t file, const std::string& name) {
  // Each component must exist for H5Lexists to be asked about the next.
  std::string cur;
  std::stringstream ss(name);
  for (std::string part; std::getline(ss, part, '/');) {
    if (part.empty()) continue;
    cur += "/" + part;
    if (H5Lexists(file, cur.c_str(), H5P_DEFAULT) <= 0) return false;
  }
  return true;
}

// Reads dataset `dname` into a fresh CPU tensor with its stored dtype, after validating type and rank:
// all of it, or rows [r0, r1) of its first dimension (r1 >= 0).
Tensor read_tensor(hid_t file, const std::string& dname, const std::string& path, int64_t r0 = 0, int64_t r1 = -1) {
  const std::string what = "tensor '" + dname + "'";
  Hid d(H5Dopen2(file, dname.c_str(), H5P_DEFAULT), H5Dclose);
  if (!d.ok()) ck_fail(path, what + ": cannot open the dataset");
  DType dt;
  const std::string dn = str_attr(d, "dtype", what, path);
  if (!dtype_from_name(dn, &dt)) ck_fail(path, what + ": unknown dtype '" + dn + "'");
  Hid t(H5Dget_type(d), H5Tclose);
  const H5T_class_t cls = H5Tget_class(t);
  const bool want_float = dt == DType::F32 || dt == DType::F64;
  if ((want_float ? cls != H5T_FLOAT : cls != H5T_INTEGER) || H5Tget_size(t) != static_cast<size_t>(dtype_size(dt)))
    ck_fail(path, what + ": stored HDF5 type does not match its dtype attribute '" + dn + "'");
  Hid sp(H5Dget_space(d), H5Sclose);
  const int nd = H5Sget_simple_extent_ndims(sp);
  if (nd < 0 || nd > 16) ck_fail(path, what + ": bad dataspace");
  std::vector<hsize_t> dims(static_cast<size_t>(nd));
  if (nd > 0) H5Sget_simple_extent_dims(sp, dims.data(), nullptr);
  Shape shape;
  uint64_t numel = 1;
  for (hsize_t x : dims) {
    if (x > (1ull << 40) || __builtin_mul_overflow(numel, static_cast<uint64_t>(x), &numel) || numel > (1ull << 40))
      ck_fail(path, what + ": unreasonable shape");
    shape.push_back(static_cast<int64_t>(x));
  }
  const bool rows = r1 >= 0;
  if (rows) {
    if (nd == 0 || r0 < 0 || r0 > r1 || r1 > shape[0])
      ck_fail(path, what + ": rows [" + std::to_string(r0) + ", " + std::to_string(r1) + ") outside its shape " +
                        shape_str(shape));
    shape[0] = r1 - r0;
  }
  Tensor out = Tensor::empty(shape, dt);
  if (out.numel() == 0) return out;
  herr_t rc;
  if (rows) {
    std::vector<hsize_t> start(dims.size(), 0), count(dims);
    start[0] = static_cast<hsize_t>(r0);
    count[0] = static_cast<hsize_t>(r1 - r0);
    Hid fsp(H5Scopy(sp), H5Sclose);
    Hid msp(H5Screate_simple(nd, count.data(), nullptr), H5Sclose);
    if (H5Sselect_hyperslab(fsp, H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr) < 0)
      ck_fail(path, what + ": cannot select rows");
    rc = H5Dread(d, h5_native_of(dt), msp, fsp, H5P_DEFAULT, out.raw());
  } else {
    rc = H5Dread(d, h5_native_of(dt), H5S_ALL, H5S_ALL, H5P_DEFAULT, out.raw());
  }
  if (rc < 0) ck_fail(path, what + ": cannot read the data (file truncated or corrupt?)");
  return out;
}

// Names of all datasets below the root, relative ("params/x", "optim/m/x", ...).
std::vector<std::string> all_datasets(hid_t file) {
  struct Ctx {
    hid_t file;
    std::vector<std::string> out;
  } ctx{file, {}};
  auto cb = [](hid_t g, const char* name, const H5L_info_t* info, void* p) -> herr_t {
    auto* c = static_cast<Ctx*>(p);
    if (info->type != H5L_TYPE_HARD) return 0;
    hid_t o = H5Oopen(g, name, H5P_DEFAULT);
    if (o < 0) return 0;
    if (H5Iget_type(o) == H5I_DATASET) c->out.push_back(name);
    H5Oclose(o);
    return 0;
  };
  H5Lvisit(file, H5_INDEX_NAME, H5_ITER_INC, cb, &ctx);
  return ctx.out;
}

struct File {
  std::string path;
  Hid id;
  explicit File(const std::string& p) : path(p), id(-1, H5Fclose) {
    quiet_hdf5();
    struct stat st;
    if (::stat(p.c_str(), &st) != 0) ck_fail(p, "no such file");
    id.id = H5Fopen(p.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
    if (!id.ok()) ck_fail(p, "not a readable HDF5 file (truncated or corrupt)");
    std::string fmt = str_attr(id, "format", "file", p);
    if (fmt != "dsa-checkpoint") ck_fail(p, "format is '" + fmt + "', not 'dsa-checkpoint'");
    const int64_t v = num_attr<int64_t>(id, "format_version", p);
    if (v < 1 || v > kCheckpointFormatVersion)
      ck_fail(p, "format_version " + std::to_string(v) + " is not supported (this build reads 1.." +
                     std::to_string(kCheckpointFormatVersion) + ")");
  }
};

TrainState read_state(const File& f) {
  TrainState s;
  const std::string& p = f.path;
  s.step = num_attr<int64_t>(f.id, "step", p);
  s.stage = str_attr(f.id, "stage", "file", p);
  s.stage_step = num_attr<int64_t>(f.id, "stage_step", p);
  s.rng_seed = num_attr<uint64_t>(f.id, "rng_seed", p);
  auto scalar = [&](const char* name) {
    if (!link_exists(f.id, name)) ck_fail(p, std::string("missing dataset ") + name);
    Hid d(H5Dopen2(f.id, name, H5P_DEFAULT), H5Dclose);
    return read_str(d, false, std::string("dataset ") + name, p);
  };
  s.recipe_yaml = scalar("/meta/recipe_yaml");
  s.model_config_yaml = scalar("/meta/model_config_yaml");
  if (!link_exists(f.id, "/meta/rank_data_states")) ck_fail(p, "missing dataset /meta/rank_data_states");
  {
    Hid d(H5Dopen2(f.id, "/meta/rank_data_states", H5P_DEFAULT), H5Dclose);
    Hid t(H5Dget_type(d), H5Tclose);
    Hid sp(H5Dget_space(d), H5Sclose);
    if (H5Tget_class(t) != H5T_STRING || H5Tis_variable_str(t) <= 0 || H5Sget_simple_extent_ndims(sp) != 1)
      ck_fail(p, "/meta/rank_data_states must be a 1-D array of variable-length strings");
    hsize_t n = 0;
    H5Sget_simple_extent_dims(sp, &n, nullptr);
    if (n > (1u << 24)) ck_fail(p, "/meta/rank_data_states is unreasonably long");
    std::vector<char*> ptrs(n, nullptr);
    Hid mt = vlen_str_type();
    if (n > 0 && H5Dread(d, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, ptrs.data()) < 0)
      ck_fail(p, "cannot read /meta/rank_data_states");
    for (char* c : ptrs) {
      s.rank_data_states.push_back(c ? c : "");
      if (c) H5free_memory(c);
    }
  }
  if (!link_exists(f.id, "/meta/rng_state")) ck_fail(p, "missing dataset /meta/rng_state");
  Tensor rng = read_tensor(f.id, "/meta/rng_state", p);
  if (rng.dtype() != DType::I64 || rng.ndim() != 1) ck_fail(p, "/meta/rng_state must be a 1-D i64 array");
  for (int64_t i = 0; i < rng.numel(); ++i) s.rng_state.push_back(static_cast<uint64_t>(rng.data<int64_t>()[i]));
  return s;
}

ModelConfig parse_config(const TrainState& s, const std::string& path) {
  const std::string src = path + ":/meta/model_config_yaml";
  YAML::Node node;
  try {
    node = YAML::Load(s.model_config_yaml);
  } catch (const YAML::Exception& e) {
    ck_fail(path, "/meta/model_config_yaml does not parse: " + e.msg);
  }
  return ModelConfig::from_yaml(node, src, /*strict=*/true);
}

// Reads every parameter and extra of `f` into `params` (shapes must match) and `extra` (optim/ tensors
// only with optimizer_state).
void read_tensors(const File& f, ParamStore& params, std::map<std::string, Tensor>* extra, bool optimizer_state = true) {
  const std::string& p = f.path;
  std::set<std::string> known;
  for (Param& prm : params.all()) {
    const std::string dname = "params/" + prm.name;
    known.insert(dname);
    if (!link_exists(f.id, dname)) ck_fail(p, "missing tensor '" + prm.name + "' (" + prm.value.desc() + ")");
    Tensor t = read_tensor(f.id, dname, p);
    if (t.shape() != prm.value.shape())
      ck_fail(p, "tensor '" + prm.name + "' has shape " + shape_str(t.shape()) + " but the model config needs " +
                     shape_str(prm.value.shape()));
    if (t.dtype() != prm.value.dtype()) {
      DSA_CHECK(is_float(t.dtype()) || t.dtype() == DType::BF16, "[checkpoint] ", p, ": tensor '", prm.name,
                "' has dtype ", dtype_name(t.dtype()), ", expected ", dtype_name(prm.value.dtype()));
      t = t.to(prm.value.dtype());
    }
    prm.value.copy_from(t);
  }
  for (const std::string& name : all_datasets(f.id)) {
    if (name.rfind("meta/", 0) == 0 || known.count(name)) continue;
    if (name.rfind("params/", 0) == 0)
      ck_fail(p, "tensor '" + name.substr(7) + "' is not a parameter of the stored model config");
    if (extra && (optimizer_state || name.rfind("optim/", 0) != 0)) (*extra)[name] = read_tensor(f.id, name, p);
  }
}

}  // namespace

void write_checkpoint_file(const std::string& path, const TrainState& s, const ParamStore& params,
                           const std::map<std::string, Tensor>& extra) {
  quiet_hdf5();
  DSA_CHECK(!s.model_config_yaml.empty(), "[checkpoint] ", path, ": TrainState.model_config_yaml is empty");
  for (const auto& kv : extra) check_extra_key(kv.first, path);
  const std::string tmp = path + ".tmp";
  {
    Hid fcpl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
    // Readable by HDF5 1.8 and later (h5py everywhere), attributes of any size in dense storage.
    H5Pset_libver_bounds(fcpl, H5F_LIBVER_V18, H5F_LIBVER_LATEST);
    Hid f(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fcpl), H5Fclose);
    if (!f.ok()) ck_fail(tmp, "cannot create the file");
    write_str_attr(f, "format", "dsa-checkpoint", tmp);
    write_i64_attr(f, "format_version", kCheckpointFormatVersion, tmp);
    write_i64_attr(f, "step", s.step, tmp);
    write_str_attr(f, "stage", s.stage, tmp);
    write_i64_attr(f, "stage_step", s.stage_step, tmp);
    write_u64_attr(f, "rng_seed", s.rng_seed, tmp);
    write_strings(f, "/meta/recipe_yaml", {s.recipe_yaml}, true, tmp);
    write_strings(f, "/meta/model_config_yaml", {s.model_config_yaml}, true, tmp);
    write_strings(f, "/meta/rank_data_states", s.rank_data_states, false, tmp);
    Tensor rng = Tensor::empty({static_cast<int64_t>(s.rng_state.size())}, DType::I64);
    for (size_t i = 0; i < s.rng_state.size(); ++i) rng.data<int64_t>()[i] = static_cast<int64_t>(s.rng_state[i]);
    write_tensor(f, "/meta/rng_state", rng, nullptr, tmp);
    for (const Param& prm : params.all()) write_tensor(f, "/params/" + prm.name, prm.value, param_group_name(prm.group), tmp);
    for (const auto& [key, t] : extra) write_tensor(f, "/" + key, t, nullptr, tmp);
    if (H5Fflush(f, H5F_SCOPE_GLOBAL) < 0) ck_fail(tmp, "flush failed");
  }
  fsync_path(tmp, false);
  if (::rename(tmp.c_str(), path.c_str()) != 0) ck_fail(path, std::string("rename failed: ") + std::strerror(errno));
  fsync_path(dir_of(path), true);
}

std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  for (const std::string& f : list_dir(dir)) {
    const int64_t s = step_of_name(f);
    const bool file = ends_with(f, ".h5");
    if (s >= 0 && (file || is_sharded_checkpoint(dir + "/" + f))) out.emplace_back(s, f);
  }
  std::sort(out.begin(), out.end());
  return out;
}

void commit_latest(const std::string& dir, const std::string& name, int keep_last) {
  // The latest pointer, replaced atomically.
  const std::string latest = dir + "/latest", ltmp = latest + ".tmp";
  {
    std::ofstream out(ltmp, std::ios::trunc);
    out << name << "\n";
    out.close();
    if (!out) ck_fail(ltmp, "cannot write");
  }
  fsync_path(ltmp, false);
  if (::rename(ltmp.c_str(), latest.c_str()) != 0) ck_fail(latest, std::string("rename failed: ") + std::strerror(errno));
  fsync_path(dir, true);

  // Retention, and leftovers of saves that were killed.
  std::error_code ec;
  for (const std::string& f : list_dir(dir))
    if (f.rfind("ckpt-", 0) == 0 && ends_with(f, ".tmp")) std::filesystem::remove_all(dir + "/" + f, ec);
  if (keep_last > 0) {
    auto all = list_checkpoints(dir);
    for (size_t i = 0; i + static_cast<size_t>(keep_last) < all.size(); ++i)
      if (all[i].second != name) std::filesystem::remove_all(dir + "/" + all[i].second, ec);
  }
}

std::string save_checkpoint(const std::string& dir, const TrainState& s, const ParamStore& params,
                            const std::map<std::string, Tensor>& extra, int keep_last) {
  DSA_CHECK(s.step >= 0, "[checkpoint] ", dir, ": negative step ", s.step);
  mkdirs(dir);
  char name[64];
  std::snprintf(name, sizeof name, "ckpt-%08lld.h5", static_cast<long long>(s.step));
  const std::string path = dir + "/" + name;
  write_checkpoint_file(path, s, params, extra);
  commit_latest(dir, name, keep_last);
  return path;
}

std::string link_checkpoint(const std::string& checkpoint, const std::string& dir) {
  namespace fs = std::filesystem;
  mkdirs(dir);
  const std::string name = fs::path(checkpoint).filename().string();
  const fs::path target = fs::path(dir) / name;
  std::error_code ec;
  auto link_or_copy = [&](const fs::path& from, const fs::path& to) {
    fs::remove(to, ec);
    fs::create_hard_link(from, to, ec);
    if (ec) fs::copy_file(from, to, fs::copy_options::overwrite_existing);
  };
  if (is_dir(checkpoint)) {
    // A sharded checkpoint: its files linked into a .tmp directory renamed into place.
    const fs::path tmp = fs::path(dir) / (name + ".tmp");
    fs::remove_all(tmp, ec);
    fs::create_directories(tmp);
    for (const std::string& f : list_dir(checkpoint))
      if (f != "." && f != "..") link_or_copy(fs::path(checkpoint) / f, tmp / f);
    fsync_path(tmp.string(), true);
    fs::remove_all(target, ec);
    fs::rename(tmp, target);
  } else {
    link_or_copy(checkpoint, target);
  }
  commit_latest(dir, name, 0);
  return target.string();
}

std::string resolve_checkpoint(const std::string& p) {
  if (!is_dir(p) || is_sharded_checkpoint(p)) return p;
  const std::string latest = p + "/latest";
  std::ifstream in(latest);
  if (in) {
    std::string name;
    std::getline(in, name);
    while (!name.empty() && (name.back() == '\r' || name.back() == ' ')) name.pop_back();
    if (step_of_name(name) < 0)
      ck_fail(latest, "does not name a ckpt-<step>.h5 file or ckpt-<step> directory: '" + name + "'");
    return p + "/" + name;
  }
  auto all = list_checkpoints(p);
  if (all.empty()) ck_fail(p, "no checkpoint in the directory (no 'latest', no ckpt-*.h5, no sharded ckpt-*)");
  return p + "/" + all.back().second;
}

TrainState read_train_state(const std::string& path_or_dir) {
  const std::string path = resolve_checkpoint(path_or_dir);
  if (is_sharded_checkpoint(path)) return CheckpointSource(path).state();
  File f(path);
  return read_state(f);
}

Checkpoint load_checkpoint(const std::string& path_or_dir, bool optimizer_state) {
  const std::string path = resolve_checkpoint(path_or_dir);
  if (is_sharded_checkpoint(path)) return load_sharded_checkpoint(path, optimizer_state);
  Checkpoint c;
  File f(path);
  c.path = f.path;
  c.state = read_state(f);
  c.cfg = parse_config(c.state, f.path);
  // The master weights' dtype is that of the embedding (buffers are f32 regardless).
  DType dt = DType::F32;
  const std::string probe = "params/model.embed_tokens.weight";
  if (link_exists(f.id, probe)) {
    Hid d(H5Dopen2(f.id, probe.c_str(), H5P_DEFAULT), H5Dclose);
    if (!dtype_from_name(str_attr(d, "dtype", "tensor 'model.embed_tokens.weight'", f.path), &dt) || !is_float(dt))
      dt = DType::F32;
  }
  c.params = make_params(c.cfg, dt);
  read_tensors(f, c.params, &c.extra, optimizer_state);
  return c;
}

void load_checkpoint_into(const std::string& path_or_dir, TrainState* state, ParamStore& params,
                          std::map<std::string, Tensor>* extra) {
  const std::string path = resolve_checkpoint(path_or_dir);
  if (is_sharded_checkpoint(path)) {
    Checkpoint c = load_sharded_checkpoint(path, true);
    for (Param& p : params.all()) {
      const Tensor& t = c.params[p.name];
      DSA_CHECK(t.shape() == p.value.shape(), "[checkpoint] ", path, ": tensor '", p.name, "' has shape ",
                shape_str(t.shape()), ", the model needs ", shape_str(p.value.shape()));
      p.value.copy_from(t.dtype() == p.value.dtype() ? t : t.to(p.value.dtype()));
    }
    if (extra) *extra = std::move(c.extra);
    if (state) *state = std::move(c.state);
    return;
  }
  File f(path);
  TrainState s = read_state(f);
  read_tensors(f, params, extra);
  if (state) *state = std::move(s);
}

struct CheckpointFile::Impl {
  File f;
  explicit Impl(const std::string& p) : f(p) {}
};

CheckpointFile::CheckpointFile(const std::string& path) : impl_(new Impl(path)) {}
CheckpointFile::~CheckpointFile() { delete impl_; }
const std::string& CheckpointFile::path() const { return impl_->f.path; }
TrainState CheckpointFile::state() const { return read_state(impl_->f); }

std::vector<std::string> CheckpointFile::datasets() const {
  std::vector<std::string> out;
  for (const std::string& n : all_datasets(impl_->f.id))
    if (n.rfind("meta/", 0) != 0) out.push_back(n);
  return out;
}

bool CheckpointFile::has(const std::string& name) const { return link_exists(impl_->f.id, name); }

Shape CheckpointFile::shape(const std::string& name) const {
  if (!has(name)) ck_fail(path(), "no dataset '" + name + "'");
  Hid d(H5Dopen2(impl_->f.id, name.c_str(), H5P_DEFAULT), H5Dclose);
  Hid sp(H5Dget_space(d), H5Sclose);
  const int nd = H5Sget_simple_extent_ndims(sp);
  if (nd < 0 || nd > 16) ck_fail(path(), "dataset '" + name + "': bad dataspace");
  std::vector<hsize_t> dims(static_cast<size_t>(nd));
  if (nd > 0) H5Sget_simple_extent_dims(sp, dims.data(), nullptr);
  return Shape(dims.begin(), dims.end());
}

Tensor CheckpointFile::read(const std::string& name) const {
  if (!has(name)) ck_fail(path(), "no dataset '" + name + "'");
  return read_tensor(impl_->f.id, name, path());
}

Tensor CheckpointFile::read_rows(const std::string& name, int64_t r0, int64_t r1) const {
  if (!has(name)) ck_fail(path(), "no dataset '" + name + "'");
  return read_tensor(impl_->f.id, name, path(), r0, r1);
}

}  // namespace dsa
