#include "trainer/dist.h"

#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <limits>

namespace dsa {

namespace {
bool g_initialized = false;
int g_rank = 0, g_world = 1, g_local = 0, g_local_size = 1;

void check(int rc, const char* what) {
  if (rc != MPI_SUCCESS) Dist::abort_job(std::string("MPI call failed: ") + what);
}

// MPI counts are int: large buffers go in chunks.
template <class T>
void allreduce_chunks(T* data, int64_t n, MPI_Datatype type) {
  if (!g_initialized || g_world == 1) return;
  const int64_t chunk = std::numeric_limits<int>::max() / 2;
  for (int64_t off = 0; off < n; off += chunk) {
    const int count = static_cast<int>(std::min(chunk, n - off));
    check(MPI_Allreduce(MPI_IN_PLACE, data + off, count, type, MPI_SUM, MPI_COMM_WORLD), "MPI_Allreduce");
  }
}
}  // namespace

void Dist::init(int* argc, char*** argv) {
  if (g_initialized) return;
  int already = 0;
  MPI_Initialized(&already);
  if (!already) MPI_Init(argc, argv);
  // Errors return codes (turned into abort_job with a message) instead of MPI's silent default abort.
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_world);
  MPI_Comm local;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, g_rank, MPI_INFO_NULL, &local);
  MPI_Comm_rank(local, &g_local);
  MPI_Comm_size(local, &g_local_size);
  MPI_Comm_free(&local);
  g_initialized = true;
}

void Dist::finalize() {
  if (!g_initialized) return;
  int done = 0;
  MPI_Finalized(&done);
  if (!done) MPI_Finalize();
  g_initialized = false;
}

int Dist::rank() { return g_rank; }
int Dist::world() { return g_world; }
int Dist::local_rank() { return g_local; }
int Dist::local_size() { return g_local_size; }

void Dist::allreduce_sum(float* d, int64_t n) { allreduce_chunks(d, n, MPI_FLOAT); }
void Dist::allreduce_sum(double* d, int64_t n) { allreduce_chunks(d, n, MPI_DOUBLE); }
void Dist::allreduce_sum(int64_t* d, int64_t n) { allreduce_chunks(d, n, MPI_INT64_T); }

double Dist::allreduce_max(double v) {
  if (!g_initialized || g_world == 1) return v;
  check(MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD), "MPI_Allreduce(max)");
  return v;
}

void Dist::barrier() {
  if (g_initialized && g_world > 1) check(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
}

std::vector<std::string> Dist::allgather(const std::string& s) {
  if (!g_initialized || g_world == 1) return {s};
  int len = static_cast<int>(s.size());
  std::vector<int> lens(g_world), offs(g_world);
  check(MPI_Allgather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, MPI_COMM_WORLD), "MPI_Allgather");
  int total = 0;
  for (int r = 0; r < g_world; ++r) {
    offs[r] = total;
    total += lens[r];
  }
  std::string all(static_cast<size_t>(total), '\0');
  check(MPI_Allgatherv(s.data(), len, MPI_CHAR, all.data(), lens.data(), offs.data(), MPI_CHAR, MPI_COMM_WORLD),
        "MPI_Allgatherv");
  std::vector<std::string> out(g_world);
  for (int r = 0; r < g_world; ++r) out[r] = all.substr(offs[r], lens[r]);
  return out;
}

std::string Dist::broadcast(const std::string& s) {
  if (!g_initialized || g_world == 1) return s;
  int64_t len = static_cast<int64_t>(s.size());
  check(MPI_Bcast(&len, 1, MPI_INT64_T, 0, MPI_COMM_WORLD), "MPI_Bcast");
  std::string out = g_rank == 0 ? s : std::string(static_cast<size_t>(len), '\0');
  check(MPI_Bcast(out.data(), static_cast<int>(len), MPI_CHAR, 0, MPI_COMM_WORLD), "MPI_Bcast");
  return out;
}

void Dist::abort_job(const std::string& message, int code) {
  std::fprintf(stderr, "[rank %d/%d] fatal: %s\n", g_rank, g_world, message.c_str());
  std::fflush(stderr);
  if (g_initialized && g_world > 1) MPI_Abort(MPI_COMM_WORLD, code);
  std::exit(code);
}

}  // namespace dsa
