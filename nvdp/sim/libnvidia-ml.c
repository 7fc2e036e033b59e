/*
 * A fake libnvidia-ml.so.1 for nvdp's simulated node.
 *
 * It implements the slice of NVML that nvdp (through pynvml) uses, with the real struct layouts and return codes, so
 * the adapter runs the same code path as on a GPU node. The node comes from a line-based state file named by
 * $NVDP_SIM_STATE, which nvdp/sim/node.py writes from the node YAML; docs/simulation.md describes both formats.
 *
 * Build: gcc -shared -fPIC -O1 -Wl,-soname,libnvidia-ml.so.1 -o libnvidia-ml.so.1 libnvidia-ml.c
 * Compiling with -DNVDP_SIM_WITH_NVML_H and the real nvml.h on the include path checks every signature and struct
 * against NVIDIA's header (tests/test_sim.py does that when the header is installed).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#ifdef NVDP_SIM_WITH_NVML_H
#include <nvml.h>
#else
/* The subset of nvml.h this file needs, with NVIDIA's type names so the checked build above is a drop-in. */
typedef enum nvmlReturn_enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_ALREADY_INITIALIZED = 5,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_INSUFFICIENT_POWER = 8,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_IRQ_ISSUE = 11,
    NVML_ERROR_LIBRARY_NOT_FOUND = 12,
    NVML_ERROR_FUNCTION_NOT_FOUND = 13,
    NVML_ERROR_CORRUPTED_INFOROM = 14,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_RESET_REQUIRED = 16,
    NVML_ERROR_OPERATING_SYSTEM = 17,
    NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18,
    NVML_ERROR_IN_USE = 19,
    NVML_ERROR_MEMORY = 20,
    NVML_ERROR_NO_DATA = 21,
    NVML_ERROR_VGPU_ECC_NOT_ENABLED = 22,
    NVML_ERROR_INSUFFICIENT_RESOURCES = 23,
    NVML_ERROR_FREQ_NOT_SUPPORTED = 24,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_DEPRECATED = 26,
    NVML_ERROR_NOT_READY = 27,
    NVML_ERROR_GPU_NOT_FOUND = 28,
    NVML_ERROR_INVALID_STATE = 29,
    NVML_ERROR_UNKNOWN = 999
} nvmlReturn_t;

typedef struct nvmlDevice_st *nvmlDevice_t;
typedef struct nvmlEventSet_st *nvmlEventSet_t;
typedef struct nvmlGpuInstance_st *nvmlGpuInstance_t;

typedef enum nvmlEnableState_enum { NVML_FEATURE_DISABLED = 0, NVML_FEATURE_ENABLED = 1 } nvmlEnableState_t;

typedef enum nvmlGpuLevel_enum {
    NVML_TOPOLOGY_INTERNAL = 0,
    NVML_TOPOLOGY_SINGLE = 10,
    NVML_TOPOLOGY_MULTIPLE = 20,
    NVML_TOPOLOGY_HOSTBRIDGE = 30,
    NVML_TOPOLOGY_NODE = 40,
    NVML_TOPOLOGY_SYSTEM = 50
} nvmlGpuTopologyLevel_t;

typedef enum nvmlGpuP2PStatus_enum {
    NVML_P2P_STATUS_OK = 0,
    NVML_P2P_STATUS_CHIPSET_NOT_SUPPORED,
    NVML_P2P_STATUS_GPU_NOT_SUPPORTED,
    NVML_P2P_STATUS_IOH_TOPOLOGY_NOT_SUPPORTED,
    NVML_P2P_STATUS_DISABLED_BY_REGKEY,
    NVML_P2P_STATUS_NOT_SUPPORTED,
    NVML_P2P_STATUS_UNKNOWN
} nvmlGpuP2PStatus_t;

typedef enum nvmlGpuP2PCapsIndex_enum {
    NVML_P2P_CAPS_INDEX_READ = 0,
    NVML_P2P_CAPS_INDEX_WRITE = 1,
    NVML_P2P_CAPS_INDEX_NVLINK = 2,
    NVML_P2P_CAPS_INDEX_ATOMICS = 3,
    NVML_P2P_CAPS_INDEX_PCI = 4,
    NVML_P2P_CAPS_INDEX_UNKNOWN = 5
} nvmlGpuP2PCapsIndex_t;

typedef enum nvmlComputeMode_enum {
    NVML_COMPUTEMODE_DEFAULT = 0,
    NVML_COMPUTEMODE_EXCLUSIVE_THREAD = 1,
    NVML_COMPUTEMODE_PROHIBITED = 2,
    NVML_COMPUTEMODE_EXCLUSIVE_PROCESS = 3,
    NVML_COMPUTEMODE_COUNT
} nvmlComputeMode_t;

#define NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE 32
#define NVML_DEVICE_PCI_BUS_ID_BUFFER_V2_SIZE 16
#define NVML_DEVICE_NAME_V2_BUFFER_SIZE 96
#define NVML_NVLINK_MAX_LINKS 36
#define NVML_GPU_INSTANCE_PROFILE_COUNT 0x12
#define NVML_DEVICE_MIG_ENABLE 0x1
#define NVML_DEVICE_MIG_DISABLE 0x0

typedef struct nvmlPciInfo_st {
    char busIdLegacy[NVML_DEVICE_PCI_BUS_ID_BUFFER_V2_SIZE];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[NVML_DEVICE_PCI_BUS_ID_BUFFER_SIZE];
} nvmlPciInfo_t;

typedef struct nvmlMemory_st {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

typedef struct nvmlMemory_v2_st {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

#define NVML_STRUCT_VERSION(data, ver) (unsigned int)(sizeof(nvml##data##_v##ver##_t) | ((ver) << 24U))
#define nvmlMemory_v2 NVML_STRUCT_VERSION(Memory, 2)

typedef struct nvmlDeviceAttributes_st {
    unsigned int multiprocessorCount;
    unsigned int sharedCopyEngineCount;
    unsigned int sharedDecoderCount;
    unsigned int sharedEncoderCount;
    unsigned int sharedJpegCount;
    unsigned int sharedOfaCount;
    unsigned int gpuInstanceSliceCount;
    unsigned int computeInstanceSliceCount;
    unsigned long long memorySizeMB;
} nvmlDeviceAttributes_t;

typedef struct nvmlEventData_st {
    nvmlDevice_t device;
    unsigned long long eventType;
    unsigned long long eventData;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlEventData_t;

#define nvmlEventTypeSingleBitEccError 0x0000000000000001LL
#define nvmlEventTypeDoubleBitEccError 0x0000000000000002LL
#define nvmlEventTypePState 0x0000000000000004LL
#define nvmlEventTypeXidCriticalError 0x0000000000000008LL
#define nvmlEventTypeClock 0x0000000000000010LL

typedef struct nvmlGpuInstancePlacement_st {
    unsigned int start;
    unsigned int size;
} nvmlGpuInstancePlacement_t;

typedef struct nvmlGpuInstanceInfo_st {
    nvmlDevice_t device;
    unsigned int id;
    unsigned int profileId;
    nvmlGpuInstancePlacement_t placement;
} nvmlGpuInstanceInfo_t;

typedef struct nvmlGpuInstanceProfileInfo_v2_st {
    unsigned int version;
    unsigned int id;
    unsigned int isP2pSupported;
    unsigned int sliceCount;
    unsigned int instanceCount;
    unsigned int multiprocessorCount;
    unsigned int copyEngineCount;
    unsigned int decoderCount;
    unsigned int encoderCount;
    unsigned int jpegCount;
    unsigned int ofaCount;
    unsigned long long memorySizeMB;
    char name[NVML_DEVICE_NAME_V2_BUFFER_SIZE];
} nvmlGpuInstanceProfileInfo_v2_t;

#define nvmlGpuInstanceProfileInfo_v2 NVML_STRUCT_VERSION(GpuInstanceProfileInfo, 2)

typedef unsigned int nvmlBrandType_t;
typedef unsigned int nvmlDeviceArchitecture_t;
#endif

#define EXPORT __attribute__((visibility("default")))

#define MAX_GPUS 32
#define MAX_MIG 8 /* MIG index space per GPU; real parts have at most 7 (8 for a few newer profiles) */
#define MAX_EVENT_SETS 64
#define MAX_TOPO 1024
#define STR 128
#define PATH_LEN 4096
#define EVENTS_POLL_NS 5000000L
#define XID_FALLEN_OFF_BUS 79
#define INSTANCE_ID_NONE 0xFFFFFFFFu
#define SUPPORTED_EVENTS                                                                                            \
    (nvmlEventTypeSingleBitEccError | nvmlEventTypeDoubleBitEccError | nvmlEventTypePState |                       \
     nvmlEventTypeXidCriticalError | nvmlEventTypeClock)

/* Tags let a handle be told apart from a stale or foreign pointer, and a GPU handle from a MIG one. */
enum { TAG_GPU = 0x47505521, TAG_MIG = 0x4d494721, TAG_GI = 0x47494e21, TAG_SET = 0x45565321 };

struct sim_gpu {
    unsigned int tag;
    unsigned int index;
    char uuid[STR];
    char name[STR];
    char bus_id[STR];
    unsigned int minor;
    unsigned long long memory_mib;
    int cc_major, cc_minor;
    int numa; /* -1: unknown, NumaNodeId answers NOT_SUPPORTED */
    int mig_capable, mig_enabled;
    unsigned int max_mig;
    int events_supported;
    int compute_mode;
    int lost;
    unsigned int nvlink_peer[NVML_NVLINK_MAX_LINKS]; /* peer GPU index per local link */
    unsigned int nvlink_count;
    int has_info;     /* a `gpuinfo` line was read: brand, architecture and SMs answer; else NOT_SUPPORTED */
    unsigned int brand, arch, sms;
};

struct sim_mig {
    unsigned int tag;
    int present;
    unsigned int parent;
    unsigned int index;
    char uuid[STR];
    char profile[64];
    unsigned int gi, ci;
    unsigned long long memory_mib;
    unsigned int profile_id;
    unsigned int slices;
    /* From a `miginfo` line (zero without one): the profile's SMs, CI slices, engines and GI placement. */
    unsigned int sms, ci_slices, copy, decoders, encoders, jpeg, ofa, placement_start, placement_size;
};

/* A GPU-instance handle: one per MIG slot, only the first slot of each GI is ever handed out. */
struct sim_gi {
    unsigned int tag;
    unsigned int parent;
    unsigned int slot;
};

struct sim_event_set {
    unsigned int tag;
    int used;
    int tailing;  /* offset is set once, at the first registration */
    long offset;  /* next byte of the events file to read */
    unsigned long long mask[MAX_GPUS];
};

struct sim_topo {
    unsigned int a, b;
    int level; /* -1: NOT_SUPPORTED */
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned int init_count;
static char driver_version[STR];
static int cuda_version;
static char events_path[PATH_LEN];
static char compute_mode_log[PATH_LEN];
static long lost_scan_offset;
static struct sim_gpu gpus[MAX_GPUS];
static unsigned int n_gpus;
static struct sim_mig migs[MAX_GPUS][MAX_MIG];
static struct sim_gi gis[MAX_GPUS][MAX_MIG];
static struct sim_topo topo[MAX_TOPO];
static unsigned int n_topo;
static struct sim_event_set event_sets[MAX_EVENT_SETS];

/* ---------------------------------------------------------------------------------------------------- state file */

static void reset_state(void) {
    memset(driver_version, 0, sizeof driver_version);
    cuda_version = 0;
    events_path[0] = compute_mode_log[0] = '\0';
    memset(gpus, 0, sizeof gpus);
    memset(migs, 0, sizeof migs);
    memset(gis, 0, sizeof gis);
    n_gpus = n_topo = 0;
}

static void strip_newline(char *s) {
    size_t n = strlen(s);
    while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == '\r'))
        s[--n] = '\0';
}

static void copy_str(char *dst, size_t cap, const char *src) {
    snprintf(dst, cap, "%s", src);
}

static struct sim_gpu *gpu_by_uuid(const char *uuid) {
    for (unsigned int i = 0; i < n_gpus; i++)
        if (strcmp(gpus[i].uuid, uuid) == 0)
            return &gpus[i];
    return NULL;
}

static struct sim_mig *mig_by_uuid(const char *uuid) {
    for (unsigned int g = 0; g < n_gpus; g++)
        for (unsigned int m = 0; m < MAX_MIG; m++)
            if (migs[g][m].present && strcmp(migs[g][m].uuid, uuid) == 0)
                return &migs[g][m];
    return NULL;
}

static long file_size(const char *path) {
    struct stat st;
    if (path[0] == '\0' || stat(path, &st) != 0)
        return 0;
    return (long)st.st_size;
}

static int parse_line(char *line, int *fail_init) {
    char word[32];
    int pos = 0;
    if (line[0] == '\0' || line[0] == '#')
        return 0;
    if (sscanf(line, "%31s %n", word, &pos) != 1)
        return 0;
    char *rest = line + pos;

    if (strcmp(word, "driver") == 0)
        return sscanf(rest, "%127s", driver_version) == 1 ? 0 : -1;
    if (strcmp(word, "cuda") == 0)
        return sscanf(rest, "%d", &cuda_version) == 1 ? 0 : -1;
    if (strcmp(word, "events") == 0) {
        copy_str(events_path, sizeof events_path, rest);
        return 0;
    }
    if (strcmp(word, "computemodelog") == 0) {
        copy_str(compute_mode_log, sizeof compute_mode_log, rest);
        return 0;
    }
    if (strcmp(word, "fail") == 0) {
        char what[32];
        int code;
        if (sscanf(rest, "%31s %d", what, &code) != 2 || strcmp(what, "init") != 0)
            return -1;
        *fail_init = code;
        return 0;
    }
    if (strcmp(word, "gpu") == 0) {
        if (n_gpus >= MAX_GPUS)
            return -1;
        struct sim_gpu *g = &gpus[n_gpus];
        int name_at = 0;
        if (sscanf(rest, "%127s %u %llu %d %d %127s %d %d %d %u %d %d %n", g->uuid, &g->minor, &g->memory_mib,
                   &g->cc_major, &g->cc_minor, g->bus_id, &g->numa, &g->mig_capable, &g->mig_enabled, &g->max_mig,
                   &g->events_supported, &g->compute_mode, &name_at) != 12 ||
            name_at == 0 || g->max_mig > MAX_MIG)
            return -1;
        copy_str(g->name, sizeof g->name, rest + name_at);
        g->tag = TAG_GPU;
        g->index = n_gpus++;
        return 0;
    }
    if (strcmp(word, "mig") == 0) {
        struct sim_mig m;
        memset(&m, 0, sizeof m);
        if (sscanf(rest, "%u %u %127s %u %u %llu %u %u %63s", &m.parent, &m.index, m.uuid, &m.gi, &m.ci,
                   &m.memory_mib, &m.profile_id, &m.slices, m.profile) != 9 ||
            m.parent >= n_gpus || m.index >= MAX_MIG)
            return -1;
        m.tag = TAG_MIG;
        m.present = 1;
        migs[m.parent][m.index] = m;
        return 0;
    }
    if (strcmp(word, "gpuinfo") == 0) {
        unsigned int g, brand, arch, sms;
        if (sscanf(rest, "%u %u %u %u", &g, &brand, &arch, &sms) != 4 || g >= n_gpus)
            return -1;
        gpus[g].has_info = 1;
        gpus[g].brand = brand;
        gpus[g].arch = arch;
        gpus[g].sms = sms;
        return 0;
    }
    if (strcmp(word, "miginfo") == 0) {
        unsigned int g, slot;
        struct sim_mig x;
        if (sscanf(rest, "%u %u %u %u %u %u %u %u %u %u %u", &g, &slot, &x.sms, &x.ci_slices, &x.copy, &x.decoders,
                   &x.encoders, &x.jpeg, &x.ofa, &x.placement_start, &x.placement_size) != 11 ||
            g >= n_gpus || slot >= MAX_MIG || !migs[g][slot].present)
            return -1;
        struct sim_mig *m = &migs[g][slot];
        m->sms = x.sms;
        m->ci_slices = x.ci_slices;
        m->copy = x.copy;
        m->decoders = x.decoders;
        m->encoders = x.encoders;
        m->jpeg = x.jpeg;
        m->ofa = x.ofa;
        m->placement_start = x.placement_start;
        m->placement_size = x.placement_size;
        return 0;
    }
    if (strcmp(word, "nvlink") == 0) {
        unsigned int a, b, n;
        if (sscanf(rest, "%u %u %u", &a, &b, &n) != 3 || a >= n_gpus || b >= n_gpus || a == b)
            return -1;
        for (unsigned int k = 0; k < n; k++) {
            if (gpus[a].nvlink_count >= NVML_NVLINK_MAX_LINKS || gpus[b].nvlink_count >= NVML_NVLINK_MAX_LINKS)
                return -1;
            gpus[a].nvlink_peer[gpus[a].nvlink_count++] = b;
            gpus[b].nvlink_peer[gpus[b].nvlink_count++] = a;
        }
        return 0;
    }
    if (strcmp(word, "topo") == 0) {
        struct sim_topo t;
        if (n_topo >= MAX_TOPO || sscanf(rest, "%u %u %d", &t.a, &t.b, &t.level) != 3)
            return -1;
        topo[n_topo++] = t;
        return 0;
    }
    if (strcmp(word, "lost") == 0) {
        char uuid[STR];
        struct sim_gpu *g;
        if (sscanf(rest, "%127s", uuid) != 1 || (g = gpu_by_uuid(uuid)) == NULL)
            return -1;
        g->lost = 1;
        return 0;
    }
    return -1;
}

static nvmlReturn_t load_state(void) {
    const char *path = getenv("NVDP_SIM_STATE");
    char line[1024];
    int fail_init = 0, lineno = 0;
    reset_state();
    if (path == NULL || path[0] == '\0')
        return NVML_ERROR_DRIVER_NOT_LOADED; /* as on a host where the library exists but no driver does */
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        fprintf(stderr, "nvdp-sim: cannot open state file %s: %s\n", path, strerror(errno));
        return NVML_ERROR_DRIVER_NOT_LOADED;
    }
    while (fgets(line, sizeof line, f) != NULL) {
        lineno++;
        strip_newline(line);
        if (parse_line(line, &fail_init) != 0) {
            fprintf(stderr, "nvdp-sim: %s:%d: cannot parse: %s\n", path, lineno, line);
            fclose(f);
            reset_state();
            return NVML_ERROR_UNKNOWN;
        }
    }
    fclose(f);
    if (fail_init != 0) {
        reset_state();
        return (nvmlReturn_t)fail_init;
    }
    for (unsigned int g = 0; g < n_gpus; g++)
        for (unsigned int m = 0; m < MAX_MIG; m++)
            gis[g][m] = (struct sim_gi){TAG_GI, g, m};
    /* Faults injected through the events file count from now on, as a driver only reports what happens live. */
    lost_scan_offset = file_size(events_path);
    return NVML_SUCCESS;
}

/* ------------------------------------------------------------------------------------------------ events file */

enum line_kind { LINE_NONE, LINE_XID, LINE_ECC, LINE_LOST };

/* Reads one complete line at *offset; 1 if a line was consumed, 0 if none is complete yet. */
static int read_line_at(const char *path, long *offset, char *buf, size_t cap) {
    FILE *f;
    long size = file_size(path);
    if (size < *offset)
        *offset = 0; /* truncated or replaced: start over like `tail -F` */
    if (size == *offset || (f = fopen(path, "r")) == NULL)
        return 0;
    if (fseek(f, *offset, SEEK_SET) != 0 || fgets(buf, (int)cap, f) == NULL) {
        fclose(f);
        return 0;
    }
    fclose(f);
    size_t n = strlen(buf);
    if (n == 0)
        return 0;
    if (buf[n - 1] != '\n' && n + 1 < cap)
        return 0; /* a writer is mid-line: wait for the rest */
    *offset += (long)n;
    strip_newline(buf);
    return 1;
}

static enum line_kind parse_event_line(const char *line, char *uuid, unsigned long long *code) {
    char word[16];
    if (sscanf(line, "%15s %127s", word, uuid) != 2)
        return LINE_NONE;
    if (strcmp(word, "xid") == 0)
        return sscanf(line, "%*s %*s %llu", code) == 1 ? LINE_XID : LINE_NONE;
    if (strcmp(word, "ecc") == 0)
        return LINE_ECC;
    if (strcmp(word, "lost") == 0)
        return LINE_LOST;
    return LINE_NONE;
}

static void scan_lost_lines(void) {
    char line[512], uuid[STR];
    unsigned long long code;
    if (events_path[0] == '\0')
        return;
    while (read_line_at(events_path, &lost_scan_offset, line, sizeof line)) {
        struct sim_gpu *g;
        if (parse_event_line(line, uuid, &code) == LINE_LOST && (g = gpu_by_uuid(uuid)) != NULL)
            g->lost = 1;
    }
}

/* ------------------------------------------------------------------------------------------------- handles */

static struct sim_gpu *as_gpu(nvmlDevice_t h) {
    struct sim_gpu *g = (struct sim_gpu *)h;
    if (g < gpus || g >= gpus + n_gpus || g->tag != TAG_GPU)
        return NULL;
    return g;
}

static struct sim_mig *as_mig(nvmlDevice_t h) {
    struct sim_mig *m = (struct sim_mig *)h;
    struct sim_mig *first = &migs[0][0];
    if (m < first || m >= first + MAX_GPUS * MAX_MIG || m->tag != TAG_MIG || !m->present || m->parent >= n_gpus)
        return NULL;
    return m;
}

/* Resolves any device handle: the physical GPU it lives on and, for a MIG handle, the MIG device. */
static nvmlReturn_t resolve(nvmlDevice_t h, struct sim_gpu **gpu, struct sim_mig **mig) {
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    scan_lost_lines();
    struct sim_gpu *g = as_gpu(h);
    struct sim_mig *m = NULL;
    if (g == NULL) {
        m = as_mig(h);
        if (m == NULL)
            return NVML_ERROR_INVALID_ARGUMENT;
        g = &gpus[m->parent];
    }
    if (g->lost)
        return NVML_ERROR_GPU_IS_LOST;
    *gpu = g;
    if (mig != NULL)
        *mig = m;
    return NVML_SUCCESS;
}

/* For queries that only make sense on a physical GPU. */
static nvmlReturn_t resolve_gpu(nvmlDevice_t h, struct sim_gpu **gpu) {
    struct sim_mig *m = NULL;
    nvmlReturn_t rc = resolve(h, gpu, &m);
    if (rc == NVML_SUCCESS && m != NULL)
        return NVML_ERROR_NOT_SUPPORTED;
    return rc;
}

#define LOCKED(expr)                                                                                               \
    do {                                                                                                           \
        pthread_mutex_lock(&lock);                                                                                 \
        nvmlReturn_t rc_ = (expr);                                                                                 \
        pthread_mutex_unlock(&lock);                                                                               \
        return rc_;                                                                                                \
    } while (0)

static nvmlReturn_t put_string(char *dst, unsigned int length, const char *src) {
    if (dst == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

/* ------------------------------------------------------------------------------------------- init and system */

static nvmlReturn_t do_init(void) {
    /* Re-reading on every init lets one process switch simulated nodes between shutdown and init. */
    nvmlReturn_t rc = load_state();
    if (rc != NVML_SUCCESS)
        return rc;
    init_count++;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    LOCKED(do_init());
}

EXPORT nvmlReturn_t nvmlInit_v2(void) {
    LOCKED(do_init());
}

static nvmlReturn_t do_shutdown(void) {
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (--init_count == 0)
        for (int i = 0; i < MAX_EVENT_SETS; i++)
            event_sets[i].used = 0;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlShutdown(void) {
    LOCKED(do_shutdown());
}

EXPORT const char *nvmlErrorString(nvmlReturn_t result) {
    switch ((int)result) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 5: return "Already Initialized";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 8: return "Insufficient External Power";
    case 9: return "Driver Not Loaded";
    case 10: return "Timeout";
    case 11: return "Interrupt Request Issue";
    case 12: return "NVML Shared Library Not Found";
    case 13: return "Function Not Found";
    case 14: return "Corrupted infoROM";
    case 15: return "GPU is lost";
    case 16: return "GPU requires restart";
    case 17: return "The operating system has blocked the request";
    case 18: return "RM has detected an NVML/RM version mismatch";
    case 19: return "In use by another client";
    case 20: return "Insufficient Memory";
    case 21: return "No data";
    case 22: return "ECC is not enabled";
    case 23: return "Insufficient resources";
    case 25: return "Struct version mismatch";
    case 26: return "Deprecated";
    case 27: return "Not ready";
    case 28: return "GPU not found";
    case 29: return "Invalid state";
    default: return "Unknown Error";
    }
}

static nvmlReturn_t get_driver_version(char *version, unsigned int length) {
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    return put_string(version, length, driver_version);
}

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    LOCKED(get_driver_version(version, length));
}

static nvmlReturn_t get_cuda_version(int *v) {
    if (v == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    *v = cuda_version;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *cudaDriverVersion) {
    LOCKED(get_cuda_version(cudaDriverVersion));
}

EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *cudaDriverVersion) {
    LOCKED(get_cuda_version(cudaDriverVersion));
}

/* ------------------------------------------------------------------------------------------------ enumeration */

static nvmlReturn_t get_count(unsigned int *count) {
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (count == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *count = n_gpus;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount) {
    LOCKED(get_count(deviceCount));
}

static nvmlReturn_t handle_by_index(unsigned int index, nvmlDevice_t *device) {
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (device == NULL || index >= n_gpus)
        return NVML_ERROR_INVALID_ARGUMENT;
    scan_lost_lines();
    if (gpus[index].lost)
        return NVML_ERROR_GPU_IS_LOST;
    *device = (nvmlDevice_t)&gpus[index];
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    LOCKED(handle_by_index(index, device));
}

static nvmlReturn_t handle_by_uuid(const char *uuid, nvmlDevice_t *device) {
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (uuid == NULL || device == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    scan_lost_lines();
    struct sim_gpu *g = gpu_by_uuid(uuid);
    struct sim_mig *m = g == NULL ? mig_by_uuid(uuid) : NULL;
    if (g == NULL && m == NULL)
        return NVML_ERROR_NOT_FOUND;
    if ((g != NULL ? g : &gpus[m->parent])->lost)
        return NVML_ERROR_GPU_IS_LOST;
    *device = g != NULL ? (nvmlDevice_t)g : (nvmlDevice_t)m;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    LOCKED(handle_by_uuid(uuid, device));
}

/* ------------------------------------------------------------------------------------------- device queries */

static nvmlReturn_t get_uuid(nvmlDevice_t device, char *uuid, unsigned int length) {
    struct sim_gpu *g;
    struct sim_mig *m;
    nvmlReturn_t rc = resolve(device, &g, &m);
    if (rc != NVML_SUCCESS)
        return rc;
    return put_string(uuid, length, m != NULL ? m->uuid : g->uuid);
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    LOCKED(get_uuid(device, uuid, length));
}

static nvmlReturn_t get_name(nvmlDevice_t device, char *name, unsigned int length) {
    struct sim_gpu *g;
    struct sim_mig *m;
    char buf[2 * STR + 8];
    nvmlReturn_t rc = resolve(device, &g, &m);
    if (rc != NVML_SUCCESS)
        return rc;
    if (m != NULL)
        snprintf(buf, sizeof buf, "%s MIG %s", g->name, m->profile);
    else
        snprintf(buf, sizeof buf, "%s", g->name);
    return put_string(name, length, buf);
}

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    LOCKED(get_name(device, name, length));
}

static nvmlReturn_t memory_of(nvmlDevice_t device, unsigned long long *total) {
    struct sim_gpu *g;
    struct sim_mig *m;
    nvmlReturn_t rc = resolve(device, &g, &m);
    if (rc == NVML_SUCCESS)
        *total = (m != NULL ? m->memory_mib : g->memory_mib) * 1024ULL * 1024ULL;
    return rc;
}

static nvmlReturn_t get_memory(nvmlDevice_t device, nvmlMemory_t *memory) {
    unsigned long long total = 0;
    if (memory == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = memory_of(device, &total);
    if (rc == NVML_SUCCESS)
        *memory = (nvmlMemory_t){.total = total, .free = total, .used = 0};
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    LOCKED(get_memory(device, memory));
}

static nvmlReturn_t get_memory_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    unsigned long long total = 0;
    if (memory == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != nvmlMemory_v2)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    nvmlReturn_t rc = memory_of(device, &total);
    if (rc == NVML_SUCCESS) {
        memory->total = total;
        memory->reserved = 0;
        memory->free = total;
        memory->used = 0;
    }
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    LOCKED(get_memory_v2(device, memory));
}

static nvmlReturn_t get_minor(nvmlDevice_t device, unsigned int *minor) {
    struct sim_gpu *g;
    if (minor == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = resolve_gpu(device, &g);
    if (rc == NVML_SUCCESS)
        *minor = g->minor;
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minorNumber) {
    LOCKED(get_minor(device, minorNumber));
}

static void fill_pci(const struct sim_gpu *g, nvmlPciInfo_t *pci) {
    unsigned int domain = 0, bus = 0, dev = 0, fn = 0;
    memset(pci, 0, sizeof *pci);
    sscanf(g->bus_id, "%x:%x:%x.%x", &domain, &bus, &dev, &fn);
    pci->domain = domain;
    pci->bus = bus;
    pci->device = dev;
    pci->pciDeviceId = 0x10DE; /* NVIDIA's vendor id in the low half; the device id is not modelled */
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%04X:%02X:%02X.0", domain & 0xFFFF, bus, dev);
    snprintf(pci->busId, sizeof pci->busId, "%08X:%02X:%02X.0", domain, bus, dev);
}

static nvmlReturn_t get_pci(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    struct sim_gpu *g;
    if (pci == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = resolve_gpu(device, &g);
    if (rc == NVML_SUCCESS)
        fill_pci(g, pci);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    LOCKED(get_pci(device, pci));
}

static nvmlReturn_t get_cc(nvmlDevice_t device, int *major, int *minor) {
    struct sim_gpu *g;
    if (major == NULL || minor == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = resolve(device, &g, NULL);
    if (rc == NVML_SUCCESS) {
        *major = g->cc_major;
        *minor = g->cc_minor;
    }
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t device, int *major, int *minor) {
    LOCKED(get_cc(device, major, minor));
}

/* Brand and architecture: NOT_SUPPORTED unless the node names them (old drivers lack the calls). */
static nvmlReturn_t get_info(nvmlDevice_t device, unsigned int *value, int which) {
    struct sim_gpu *g;
    if (value == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = resolve(device, &g, NULL);
    if (rc != NVML_SUCCESS)
        return rc;
    if (!g->has_info)
        return NVML_ERROR_NOT_SUPPORTED;
    *value = which ? g->arch : g->brand;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetBrand(nvmlDevice_t device, nvmlBrandType_t *type) {
    LOCKED(get_info(device, (unsigned int *)type, 0));
}

EXPORT nvmlReturn_t nvmlDeviceGetArchitecture(nvmlDevice_t device, nvmlDeviceArchitecture_t *arch) {
    LOCKED(get_info(device, (unsigned int *)arch, 1));
}

static nvmlReturn_t get_index(nvmlDevice_t device, unsigned int *index) {
    struct sim_gpu *g;
    if (index == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = resolve_gpu(device, &g);
    if (rc == NVML_SUCCESS)
        *index = g->index;
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    LOCKED(get_index(device, index));
}

static nvmlReturn_t get_numa(nvmlDevice_t device, unsigned int *node) {
    struct sim_gpu *g;
    if (node == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = resolve_gpu(device, &g);
    if (rc != NVML_SUCCESS)
        return rc;
    if (g->numa < 0)
        return NVML_ERROR_NOT_SUPPORTED;
    *node = (unsigned int)g->numa;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetNumaNodeId(nvmlDevice_t device, unsigned int *node) {
    LOCKED(get_numa(device, node));
}

static nvmlReturn_t get_compute_mode(nvmlDevice_t device, nvmlComputeMode_t *mode) {
    struct sim_gpu *g;
    if (mode == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = resolve_gpu(device, &g);
    if (rc == NVML_SUCCESS)
        *mode = (nvmlComputeMode_t)g->compute_mode;
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeMode(nvmlDevice_t device, nvmlComputeMode_t *mode) {
    LOCKED(get_compute_mode(device, mode));
}

static nvmlReturn_t set_compute_mode(nvmlDevice_t device, nvmlComputeMode_t mode) {
    struct sim_gpu *g;
    nvmlReturn_t rc = resolve_gpu(device, &g);
    if (rc != NVML_SUCCESS)
        return rc;
    if ((int)mode < 0 || (int)mode >= (int)NVML_COMPUTEMODE_COUNT)
        return NVML_ERROR_INVALID_ARGUMENT;
    g->compute_mode = (int)mode;
    if (compute_mode_log[0] != '\0') {
        FILE *f = fopen(compute_mode_log, "a");
        if (f == NULL)
            return NVML_ERROR_UNKNOWN;
        fprintf(f, "computemode %s %d\n", g->uuid, (int)mode);
        fclose(f);
    }
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceSetComputeMode(nvmlDevice_t device, nvmlComputeMode_t mode) {
    LOCKED(set_compute_mode(device, mode));
}

/* ------------------------------------------------------------------------------------------------------- MIG */

static nvmlReturn_t get_mig_mode(nvmlDevice_t device, unsigned int *current, unsigned int *pending) {
    struct sim_gpu *g;
    if (current == NULL || pending == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = resolve_gpu(device, &g);
    if (rc != NVML_SUCCESS)
        return rc;
    if (!g->mig_capable)
        return NVML_ERROR_NOT_SUPPORTED;
    *current = *pending = g->mig_enabled ? NVML_DEVICE_MIG_ENABLE : NVML_DEVICE_MIG_DISABLE;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *currentMode, unsigned int *pendingMode) {
    LOCKED(get_mig_mode(device, currentMode, pendingMode));
}

static nvmlReturn_t get_max_mig(nvmlDevice_t device, unsigned int *count) {
    struct sim_gpu *g;
    if (count == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = resolve_gpu(device, &g);
    if (rc == NVML_SUCCESS)
        *count = g->mig_capable && g->mig_enabled ? g->max_mig : 0; /* zero when MIG is off, per nvml.h */
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count) {
    LOCKED(get_max_mig(device, count));
}

static nvmlReturn_t mig_by_index(nvmlDevice_t device, unsigned int index, nvmlDevice_t *mig) {
    struct sim_gpu *g;
    if (mig == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = resolve_gpu(device, &g);
    if (rc != NVML_SUCCESS)
        return rc == NVML_ERROR_NOT_SUPPORTED ? NVML_ERROR_INVALID_ARGUMENT : rc;
    if (!g->mig_capable || !g->mig_enabled)
        return NVML_ERROR_NOT_SUPPORTED;
    if (index >= g->max_mig)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!migs[g->index][index].present)
        return NVML_ERROR_NOT_FOUND; /* a hole left by a destroyed GPU or compute instance */
    *mig = (nvmlDevice_t)&migs[g->index][index];
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index,
                                                       nvmlDevice_t *migDevice) {
    LOCKED(mig_by_index(device, index, migDevice));
}

static nvmlReturn_t is_mig(nvmlDevice_t device, unsigned int *is_mig_device) {
    struct sim_gpu *g;
    struct sim_mig *m;
    if (is_mig_device == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = resolve(device, &g, &m);
    if (rc == NVML_SUCCESS)
        *is_mig_device = m != NULL;
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *isMigDevice) {
    LOCKED(is_mig(device, isMigDevice));
}

static nvmlReturn_t parent_of(nvmlDevice_t mig_device, nvmlDevice_t *device) {
    struct sim_gpu *g;
    struct sim_mig *m;
    if (device == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = resolve(mig_device, &g, &m);
    if (rc != NVML_SUCCESS)
        return rc;
    if (m == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *device = (nvmlDevice_t)g;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t migDevice, nvmlDevice_t *device) {
    LOCKED(parent_of(migDevice, device));
}

static nvmlReturn_t instance_id(nvmlDevice_t device, unsigned int *id, int compute) {
    struct sim_gpu *g;
    struct sim_mig *m;
    if (id == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = resolve(device, &g, &m);
    if (rc != NVML_SUCCESS)
        return rc;
    if (m == NULL)
        return NVML_ERROR_NOT_SUPPORTED;
    *id = compute ? m->ci : m->gi;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t device, unsigned int *id) {
    LOCKED(instance_id(device, id, 0));
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t device, unsigned int *id) {
    LOCKED(instance_id(device, id, 1));
}

static nvmlReturn_t get_attributes(nvmlDevice_t device, nvmlDeviceAttributes_t *attrs) {
    struct sim_gpu *g;
    struct sim_mig *m;
    if (attrs == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = resolve(device, &g, &m);
    if (rc != NVML_SUCCESS)
        return rc;
    memset(attrs, 0, sizeof *attrs);
    if (m == NULL) {
        /* nvml.h documents MIG handles only; drivers that answer for a whole GPU give its SM count. The fake
         * answers when the node says how many SMs the GPU has, so both paths of the adapter are exercised. */
        if (!g->has_info || g->sms == 0)
            return NVML_ERROR_NOT_SUPPORTED;
        attrs->multiprocessorCount = g->sms;
        attrs->memorySizeMB = g->memory_mib;
        return NVML_SUCCESS;
    }
    attrs->multiprocessorCount = m->sms;
    attrs->sharedCopyEngineCount = m->copy;
    attrs->sharedDecoderCount = m->decoders;
    attrs->sharedEncoderCount = m->encoders;
    attrs->sharedJpegCount = m->jpeg;
    attrs->sharedOfaCount = m->ofa;
    attrs->gpuInstanceSliceCount = m->slices;
    attrs->computeInstanceSliceCount = m->ci_slices;
    attrs->memorySizeMB = m->memory_mib;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetAttributes_v2(nvmlDevice_t device, nvmlDeviceAttributes_t *attributes) {
    LOCKED(get_attributes(device, attributes));
}

static nvmlReturn_t gi_by_id(nvmlDevice_t device, unsigned int id, nvmlGpuInstance_t *gi) {
    struct sim_gpu *g;
    if (gi == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = resolve_gpu(device, &g);
    if (rc != NVML_SUCCESS)
        return rc == NVML_ERROR_NOT_SUPPORTED ? NVML_ERROR_INVALID_ARGUMENT : rc;
    if (!g->mig_capable || !g->mig_enabled)
        return NVML_ERROR_NOT_SUPPORTED;
    for (unsigned int s = 0; s < MAX_MIG; s++)
        if (migs[g->index][s].present && migs[g->index][s].gi == id) {
            *gi = (nvmlGpuInstance_t)&gis[g->index][s];
            return NVML_SUCCESS;
        }
    return NVML_ERROR_NOT_FOUND;
}

EXPORT nvmlReturn_t nvmlDeviceGetGpuInstanceById(nvmlDevice_t device, unsigned int id,
                                                 nvmlGpuInstance_t *gpuInstance) {
    LOCKED(gi_by_id(device, id, gpuInstance));
}

static nvmlReturn_t gi_info(nvmlGpuInstance_t handle, nvmlGpuInstanceInfo_t *info) {
    struct sim_gi *gi = (struct sim_gi *)handle;
    struct sim_gi *first = &gis[0][0];
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (info == NULL || gi < first || gi >= first + MAX_GPUS * MAX_MIG || gi->tag != TAG_GI ||
        gi->parent >= n_gpus || !migs[gi->parent][gi->slot].present)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (gpus[gi->parent].lost)
        return NVML_ERROR_GPU_IS_LOST;
    const struct sim_mig *m = &migs[gi->parent][gi->slot];
    info->device = (nvmlDevice_t)&gpus[gi->parent];
    info->id = m->gi;
    info->profileId = m->profile_id;
    info->placement.start = m->placement_start;
    info->placement.size = m->placement_size;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlGpuInstanceGetInfo(nvmlGpuInstance_t gpuInstance, nvmlGpuInstanceInfo_t *info) {
    LOCKED(gi_info(gpuInstance, info));
}

/* Only the profiles in use on the GPU are known to the fake: others answer NOT_SUPPORTED. */
static nvmlReturn_t gi_profile_info(nvmlDevice_t device, unsigned int profile, nvmlGpuInstanceProfileInfo_v2_t *info) {
    struct sim_gpu *g;
    if (info == NULL || profile >= NVML_GPU_INSTANCE_PROFILE_COUNT)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (info->version != nvmlGpuInstanceProfileInfo_v2)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    nvmlReturn_t rc = resolve_gpu(device, &g);
    if (rc != NVML_SUCCESS)
        return rc == NVML_ERROR_NOT_SUPPORTED ? NVML_ERROR_INVALID_ARGUMENT : rc;
    if (!g->mig_capable)
        return NVML_ERROR_NOT_SUPPORTED;
    for (unsigned int s = 0; s < MAX_MIG; s++) {
        const struct sim_mig *m = &migs[g->index][s];
        if (!m->present || m->profile_id != profile)
            continue;
        unsigned int version = info->version;
        memset(info, 0, sizeof *info);
        info->version = version;
        info->id = profile;
        info->isP2pSupported = 0;
        info->sliceCount = m->slices;
        info->instanceCount = m->slices ? 7 / m->slices : 0;
        info->multiprocessorCount = m->sms;
        info->copyEngineCount = m->copy;
        info->decoderCount = m->decoders;
        info->encoderCount = m->encoders;
        info->jpegCount = m->jpeg;
        info->ofaCount = m->ofa;
        info->memorySizeMB = m->memory_mib;
        snprintf(info->name, sizeof info->name, "MIG %s", m->profile);
        return NVML_SUCCESS;
    }
    return NVML_ERROR_NOT_SUPPORTED;
}

EXPORT nvmlReturn_t nvmlDeviceGetGpuInstanceProfileInfoV(nvmlDevice_t device, unsigned int profile,
                                                         nvmlGpuInstanceProfileInfo_v2_t *info) {
    LOCKED(gi_profile_info(device, profile, info));
}

/* -------------------------------------------------------------------------------------------------- topology */

static nvmlReturn_t common_ancestor(nvmlDevice_t d1, nvmlDevice_t d2, nvmlGpuTopologyLevel_t *level) {
    struct sim_gpu *a, *b;
    if (level == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = resolve_gpu(d1, &a);
    if (rc == NVML_SUCCESS)
        rc = resolve_gpu(d2, &b);
    if (rc != NVML_SUCCESS)
        return rc == NVML_ERROR_NOT_SUPPORTED ? NVML_ERROR_INVALID_ARGUMENT : rc;
    if (a == b) {
        *level = NVML_TOPOLOGY_INTERNAL;
        return NVML_SUCCESS;
    }
    for (unsigned int i = 0; i < n_topo; i++)
        if ((topo[i].a == a->index && topo[i].b == b->index) || (topo[i].a == b->index && topo[i].b == a->index)) {
            if (topo[i].level < 0)
                return NVML_ERROR_NOT_SUPPORTED;
            *level = (nvmlGpuTopologyLevel_t)topo[i].level;
            return NVML_SUCCESS;
        }
    /* Unlisted pairs: behind the same CPU when their NUMA nodes agree, across CPUs otherwise. */
    *level = a->numa == b->numa ? NVML_TOPOLOGY_NODE : NVML_TOPOLOGY_SYSTEM;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetTopologyCommonAncestor(nvmlDevice_t device1, nvmlDevice_t device2,
                                                        nvmlGpuTopologyLevel_t *pathInfo) {
    LOCKED(common_ancestor(device1, device2, pathInfo));
}

/* A GPU's NVLinks are numbered 0..count-1; other link numbers answer NOT_SUPPORTED, as on parts with fewer links. */
static nvmlReturn_t nvlink_peer(nvmlDevice_t device, unsigned int link, struct sim_gpu **peer) {
    struct sim_gpu *g;
    nvmlReturn_t rc = resolve_gpu(device, &g);
    if (rc != NVML_SUCCESS)
        return rc;
    if (link >= NVML_NVLINK_MAX_LINKS)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (link >= g->nvlink_count)
        return NVML_ERROR_NOT_SUPPORTED;
    *peer = &gpus[g->nvlink_peer[link]];
    return NVML_SUCCESS;
}

static nvmlReturn_t nvlink_state(nvmlDevice_t device, unsigned int link, nvmlEnableState_t *active) {
    struct sim_gpu *peer;
    if (active == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = nvlink_peer(device, link, &peer);
    if (rc == NVML_SUCCESS)
        *active = NVML_FEATURE_ENABLED;
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetNvLinkState(nvmlDevice_t device, unsigned int link, nvmlEnableState_t *isActive) {
    LOCKED(nvlink_state(device, link, isActive));
}

static nvmlReturn_t nvlink_remote_pci(nvmlDevice_t device, unsigned int link, nvmlPciInfo_t *pci) {
    struct sim_gpu *peer;
    if (pci == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = nvlink_peer(device, link, &peer);
    if (rc == NVML_SUCCESS)
        fill_pci(peer, pci);
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetNvLinkRemotePciInfo_v2(nvmlDevice_t device, unsigned int link, nvmlPciInfo_t *pci) {
    LOCKED(nvlink_remote_pci(device, link, pci));
}

static nvmlReturn_t p2p_status(nvmlDevice_t d1, nvmlDevice_t d2, nvmlGpuP2PCapsIndex_t index,
                               nvmlGpuP2PStatus_t *status) {
    struct sim_gpu *a, *b;
    if (status == NULL || (int)index < 0 || (int)index >= (int)NVML_P2P_CAPS_INDEX_UNKNOWN)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = resolve_gpu(d1, &a);
    if (rc == NVML_SUCCESS)
        rc = resolve_gpu(d2, &b);
    if (rc != NVML_SUCCESS)
        return rc == NVML_ERROR_NOT_SUPPORTED ? NVML_ERROR_INVALID_ARGUMENT : rc;
    if (index == NVML_P2P_CAPS_INDEX_NVLINK) {
        int linked = 0;
        for (unsigned int k = 0; k < a->nvlink_count; k++)
            linked |= a->nvlink_peer[k] == b->index;
        *status = linked ? NVML_P2P_STATUS_OK : NVML_P2P_STATUS_NOT_SUPPORTED;
    } else {
        *status = NVML_P2P_STATUS_OK;
    }
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetP2PStatus(nvmlDevice_t device1, nvmlDevice_t device2,
                                           nvmlGpuP2PCapsIndex_t p2pIndex, nvmlGpuP2PStatus_t *p2pStatus) {
    LOCKED(p2p_status(device1, device2, p2pIndex, p2pStatus));
}

/* ---------------------------------------------------------------------------------------------------- events */

static struct sim_event_set *as_set(nvmlEventSet_t handle) {
    struct sim_event_set *s = (struct sim_event_set *)handle;
    if (s < event_sets || s >= event_sets + MAX_EVENT_SETS || s->tag != TAG_SET || !s->used)
        return NULL;
    return s;
}

static nvmlReturn_t set_create(nvmlEventSet_t *set) {
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (set == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (int i = 0; i < MAX_EVENT_SETS; i++)
        if (!event_sets[i].used) {
            memset(&event_sets[i], 0, sizeof event_sets[i]);
            event_sets[i].tag = TAG_SET;
            event_sets[i].used = 1;
            *set = (nvmlEventSet_t)&event_sets[i];
            return NVML_SUCCESS;
        }
    return NVML_ERROR_INSUFFICIENT_RESOURCES;
}

EXPORT nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    LOCKED(set_create(set));
}

static nvmlReturn_t supported_events(nvmlDevice_t device, unsigned long long *types) {
    struct sim_gpu *g;
    if (types == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t rc = resolve_gpu(device, &g);
    if (rc == NVML_SUCCESS)
        *types = g->events_supported ? SUPPORTED_EVENTS : 0;
    return rc;
}

EXPORT nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *eventTypes) {
    LOCKED(supported_events(device, eventTypes));
}

static nvmlReturn_t register_events(nvmlDevice_t device, unsigned long long types, nvmlEventSet_t handle) {
    struct sim_gpu *g;
    struct sim_event_set *s = as_set(handle);
    nvmlReturn_t rc = resolve_gpu(device, &g); /* nvml.h: MIG handles cannot register; use the parent */
    if (rc != NVML_SUCCESS)
        return rc;
    if (s == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!g->events_supported || (types & ~(unsigned long long)SUPPORTED_EVENTS) != 0)
        return NVML_ERROR_NOT_SUPPORTED;
    if (!s->tailing) {
        /* Events count from the set's first registration: lines already in the file are history. */
        s->offset = file_size(events_path);
        s->tailing = 1;
    }
    s->mask[g->index] |= types;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long eventTypes,
                                             nvmlEventSet_t set) {
    LOCKED(register_events(device, eventTypes, set));
}

/* Consumes lines until one is an event for this set: 1 and *data filled, or 0 when the file has no more lines. */
static int next_event(struct sim_event_set *s, nvmlEventData_t *data) {
    char line[512], uuid[STR];
    unsigned long long code = 0;
    while (s->tailing && read_line_at(events_path, &s->offset, line, sizeof line)) {
        enum line_kind kind = parse_event_line(line, uuid, &code);
        if (kind == LINE_NONE)
            continue;
        struct sim_gpu *g = gpu_by_uuid(uuid);
        struct sim_mig *m = g == NULL ? mig_by_uuid(uuid) : NULL;
        if (m != NULL)
            g = &gpus[m->parent];
        if (g == NULL)
            continue;
        unsigned long long type = kind == LINE_ECC ? nvmlEventTypeDoubleBitEccError : nvmlEventTypeXidCriticalError;
        if (kind == LINE_LOST) {
            g->lost = 1;
            code = XID_FALLEN_OFF_BUS;
        }
        if ((s->mask[g->index] & type) == 0)
            continue;
        memset(data, 0, sizeof *data);
        data->device = (nvmlDevice_t)g;
        data->eventType = type;
        data->eventData = kind == LINE_ECC ? 0 : code;
        data->gpuInstanceId = m != NULL ? m->gi : INSTANCE_ID_NONE;
        data->computeInstanceId = m != NULL ? m->ci : INSTANCE_ID_NONE;
        return 1;
    }
    return 0;
}

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* For tests: $NVDP_SIM_EVENT_WAIT_MAX_MS caps every wait, which then times out sooner than asked (to a caller a
 * timeout like any other: nvdp simply waits again). Why: stopping nvdp waits for its thread blocked here, up to its
 * 500 ms bound, and the tests stop hundreds of daemons, several of them as separate processes. Unset (the demo,
 * --simulate), a wait lasts as long as asked, like the real library's. */
static unsigned int capped_wait_ms(unsigned int timeoutms) {
    const char *cap = getenv("NVDP_SIM_EVENT_WAIT_MAX_MS");
    if (cap == NULL || *cap == '\0')
        return timeoutms;
    char *end;
    unsigned long value = strtoul(cap, &end, 10);
    if (*end != '\0' || value >= timeoutms)
        return timeoutms;
    return (unsigned int)value;
}

EXPORT nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms) {
    long long deadline = now_ns() + (long long)capped_wait_ms(timeoutms) * 1000000LL;
    if (data == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (;;) {
        /* The lock is only held per poll so other threads' queries (and this set's free) are never blocked. */
        pthread_mutex_lock(&lock);
        nvmlReturn_t rc = NVML_ERROR_TIMEOUT;
        struct sim_event_set *s = as_set(set);
        if (init_count == 0)
            rc = NVML_ERROR_UNINITIALIZED;
        else if (s == NULL)
            rc = NVML_ERROR_INVALID_ARGUMENT;
        else if (next_event(s, data))
            rc = NVML_SUCCESS;
        pthread_mutex_unlock(&lock);
        if (rc != NVML_ERROR_TIMEOUT)
            return rc;
        long long left = deadline - now_ns();
        if (left <= 0)
            return NVML_ERROR_TIMEOUT;
        struct timespec nap = {0, left < EVENTS_POLL_NS ? (long)left : EVENTS_POLL_NS};
        nanosleep(&nap, NULL);
    }
}

static nvmlReturn_t set_free(nvmlEventSet_t handle) {
    struct sim_event_set *s = as_set(handle);
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (s == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    s->used = 0;
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
    LOCKED(set_free(set));
}
