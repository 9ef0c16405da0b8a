/*
 * A scripted stand-in for NVIDIA's libnvidia-ml.so.1: the NVML entry points that
 * nvml-wrapper calls for cgsentry, answering from a text script instead of a GPU.
 *
 * The script is `fake-nvml.script` in the directory this library was loaded from
 * (each test copies the library into its own directory, so tests running in one
 * process get separate copies with separate state), or $FAKE_NVML_SCRIPT. It is read
 * at nvmlInit_v2. Lines (`#` starts a comment):
 *
 *   init_error CODE                 nvmlInit_v2 fails with NVML_ERROR_<CODE>
 *   count_error CODE                nvmlDeviceGetCount_v2 fails
 *   driver 550.54.15                nvmlSystemGetDriverVersion
 *   device IDX uuid=U name="N" total_mib=M
 *   frame                           starts the next frame; the first
 *                                   nvmlDeviceGetHandleByIndex_v2(0) call shows
 *                                   frame 0, each later one the next, the last repeats
 *   gpu IDX used_mib=M util=P mem_util=P temp=C power_mw=W
 *   proc IDX pid=P used_mib=M [sm=P mem=P] [kind=compute|graphics] [used=na]
 *   error IDX FUNCTION CODE         FUNCTION (or *) on device IDX fails in this frame
 *
 * Without a `gpu` line a device's used memory is the sum of its processes'. Frame k
 * carries timestamp (k + 1) s in µs for process utilisation samples. Each call is
 * counted: fake_nvml_calls("nvmlDeviceGetName") tells tests how often it was called.
 * nvmlInit_v2 also appends a line to `fake-nvml.inits` next to the script: a failed
 * init unloads the library, and its counters with it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
enum {
    OK = 0,
    E_UNINITIALIZED = 1,
    E_INVALID_ARGUMENT = 2,
    E_NOT_SUPPORTED = 3,
    E_NOT_FOUND = 6,
    E_INSUFFICIENT_SIZE = 7,
    E_UNKNOWN = 999,
};

typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;
typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;
typedef struct {
    unsigned int gpu, memory;
} nvmlUtilization_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;
typedef struct {
    unsigned int pid;
    unsigned long long timeStamp;
    unsigned int smUtil, memUtil, encUtil, decUtil;
} nvmlProcessUtilizationSample_t;

#define MAX_DEVICES 8
#define MAX_FRAMES 256
#define MAX_PROCS 32
#define MAX_ERRORS 16
#define MIB (1024ULL * 1024ULL)
#define NOT_AVAILABLE 0xFFFFFFFFFFFFFFFFULL

struct proc {
    unsigned pid;
    unsigned long long used;
    int graphics, has_util;
    unsigned sm, mem;
};
struct error {
    char function[64];
    int code;
};
struct state {
    int has_gpu;
    unsigned long long used;
    unsigned util, mem_util, temp, power_mw;
    int nprocs, nerrors;
    struct proc procs[MAX_PROCS];
    struct error errors[MAX_ERRORS];
};
struct device {
    unsigned index;
    char uuid[96], name[96];
    unsigned long long total;
};

static struct device devices[MAX_DEVICES];
static int ndevices;
static struct state frames[MAX_FRAMES][MAX_DEVICES];
static int nframes;
static int current = -1;
static int init_error, count_error, initialized;
static char driver[80] = "550.54.15";

#define MAX_COUNTERS 32
static struct {
    char name[64];
    long calls;
} counters[MAX_COUNTERS];

static void count(const char *name) {
    for (int i = 0; i < MAX_COUNTERS; i++) {
        if (counters[i].name[0] == 0) {
            snprintf(counters[i].name, sizeof counters[i].name, "%s", name);
        }
        if (strcmp(counters[i].name, name) == 0) {
            counters[i].calls++;
            return;
        }
    }
}

long fake_nvml_calls(const char *name) {
    for (int i = 0; i < MAX_COUNTERS && counters[i].name[0]; i++) {
        if (strcmp(counters[i].name, name) == 0) {
            return counters[i].calls;
        }
    }
    return 0;
}

static const struct {
    const char *name;
    int code;
} codes[] = {
    {"UNINITIALIZED", 1},   {"INVALID_ARGUMENT", 2},  {"NOT_SUPPORTED", 3},
    {"NO_PERMISSION", 4},   {"NOT_FOUND", 6},         {"INSUFFICIENT_SIZE", 7},
    {"DRIVER_NOT_LOADED", 9}, {"TIMEOUT", 10},        {"LIBRARY_NOT_FOUND", 12},
    {"GPU_IS_LOST", 15},    {"RESET_REQUIRED", 16},   {"NO_DATA", 21},
    {"UNKNOWN", 999},
};

static int code_of(const char *name) {
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        if (strcmp(codes[i].name, name) == 0) {
            return codes[i].code;
        }
    }
    return E_UNKNOWN;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        if (codes[i].code == result) {
            return codes[i].name;
        }
    }
    return result == OK ? "SUCCESS" : "UNKNOWN";
}

/* `key=value` from a line: copies the value (quotes stripped) into out. */
static int field(const char *line, const char *key, char *out, size_t len) {
    size_t klen = strlen(key);
    for (const char *p = line; (p = strstr(p, key)) != NULL; p++) {
        if ((p != line && p[-1] != ' ' && p[-1] != '\t') || p[klen] != '=') {
            continue;
        }
        const char *v = p + klen + 1;
        size_t n = 0;
        if (*v == '"') {
            v++;
            while (v[n] && v[n] != '"') n++;
        } else {
            while (v[n] && v[n] != ' ' && v[n] != '\t' && v[n] != '\n') n++;
        }
        if (n >= len) n = len - 1;
        memcpy(out, v, n);
        out[n] = 0;
        return 1;
    }
    return 0;
}

static unsigned long long num(const char *line, const char *key, unsigned long long dflt) {
    char v[64];
    return field(line, key, v, sizeof v) ? strtoull(v, NULL, 10) : dflt;
}

static const char *script_path(char *buf, size_t len, const char *file) {
    Dl_info info;
    if (dladdr((void *)&fake_nvml_calls, &info) && info.dli_fname) {
        const char *slash = strrchr(info.dli_fname, '/');
        if (slash) {
            snprintf(buf, len, "%.*s/%s", (int)(slash - info.dli_fname), info.dli_fname, file);
            if (strcmp(file, "fake-nvml.script") != 0) return buf;
            FILE *f = fopen(buf, "r");
            if (f) {
                fclose(f);
                return buf;
            }
        }
    }
    return getenv("FAKE_NVML_SCRIPT");
}

static void load(void) {
    memset(devices, 0, sizeof devices);
    memset(frames, 0, sizeof frames);
    ndevices = nframes = init_error = count_error = 0;
    current = -1;
    char path[4096];
    const char *p = script_path(path, sizeof path, "fake-nvml.script");
    FILE *f = p ? fopen(p, "r") : NULL;
    if (!f) {
        return;
    }
    char line[512];
    while (fgets(line, sizeof line, f)) {
        char *hash = strchr(line, '#');
        if (hash) *hash = 0;
        char word[32] = {0}, arg[64] = {0}, arg2[64] = {0};
        unsigned idx = 0;
        if (sscanf(line, "%31s", word) != 1) continue;
        struct state *st = NULL;
        if (strcmp(word, "gpu") == 0 || strcmp(word, "proc") == 0 || strcmp(word, "error") == 0) {
            if (sscanf(line, "%*s %u", &idx) != 1 || idx >= MAX_DEVICES || nframes == 0) continue;
            st = &frames[nframes - 1][idx];
        }
        if (strcmp(word, "init_error") == 0 && sscanf(line, "%*s %63s", arg) == 1) {
            init_error = code_of(arg);
        } else if (strcmp(word, "count_error") == 0 && sscanf(line, "%*s %63s", arg) == 1) {
            count_error = code_of(arg);
        } else if (strcmp(word, "driver") == 0) {
            sscanf(line, "%*s %79s", driver);
        } else if (strcmp(word, "device") == 0 && ndevices < MAX_DEVICES) {
            struct device *d = &devices[ndevices];
            d->index = (unsigned)ndevices++;
            if (!field(line, "uuid", d->uuid, sizeof d->uuid))
                snprintf(d->uuid, sizeof d->uuid, "GPU-fake-%u", d->index);
            if (!field(line, "name", d->name, sizeof d->name))
                snprintf(d->name, sizeof d->name, "Fake GPU");
            d->total = num(line, "total_mib", 16384) * MIB;
        } else if (strcmp(word, "frame") == 0 && nframes < MAX_FRAMES) {
            nframes++;
        } else if (strcmp(word, "gpu") == 0) {
            st->has_gpu = 1;
            st->used = num(line, "used_mib", 0) * MIB;
            st->util = (unsigned)num(line, "util", 0);
            st->mem_util = (unsigned)num(line, "mem_util", 0);
            st->temp = (unsigned)num(line, "temp", 40);
            st->power_mw = (unsigned)num(line, "power_mw", 50000);
        } else if (strcmp(word, "proc") == 0 && st->nprocs < MAX_PROCS) {
            struct proc *pr = &st->procs[st->nprocs++];
            char v[32];
            pr->pid = (unsigned)num(line, "pid", 0);
            pr->used = num(line, "used_mib", 0) * MIB;
            if (field(line, "used", v, sizeof v) && strcmp(v, "na") == 0) pr->used = NOT_AVAILABLE;
            pr->graphics = field(line, "kind", v, sizeof v) && strcmp(v, "graphics") == 0;
            pr->has_util = field(line, "sm", v, sizeof v);
            pr->sm = (unsigned)num(line, "sm", 0);
            pr->mem = (unsigned)num(line, "mem", 0);
        } else if (strcmp(word, "error") == 0 && st->nerrors < MAX_ERRORS &&
                   sscanf(line, "%*s %*u %63s %63s", arg, arg2) == 2) {
            struct error *e = &st->errors[st->nerrors++];
            snprintf(e->function, sizeof e->function, "%s", arg);
            e->code = code_of(arg2);
        }
    }
    fclose(f);
}

static struct state *state_of(const struct device *d) {
    if (current < 0 || nframes == 0) return NULL;
    return &frames[current][d->index];
}

/* The scripted failure of `function` on `d` in the current frame, or OK. */
static int fails(const struct device *d, const char *function) {
    struct state *st = state_of(d);
    for (int i = 0; st && i < st->nerrors; i++) {
        if (strcmp(st->errors[i].function, function) == 0 || strcmp(st->errors[i].function, "*") == 0)
            return st->errors[i].code;
    }
    return OK;
}

#define ENTER(dev, name)                                        \
    count(name);                                                \
    if (!initialized) return E_UNINITIALIZED;                   \
    if ((dev) == NULL) return E_INVALID_ARGUMENT;               \
    do {                                                        \
        int rc_ = fails((dev), name);                           \
        if (rc_ != OK) return rc_;                              \
    } while (0)

nvmlReturn_t nvmlInit_v2(void) {
    count("nvmlInit_v2");
    char path[4096];
    const char *log = script_path(path, sizeof path, "fake-nvml.inits");
    FILE *f = log ? fopen(log, "a") : NULL;
    if (f) {
        fputs("init\n", f);
        fclose(f);
    }
    load();
    if (init_error) return init_error;
    initialized = 1;
    return OK;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    return nvmlInit_v2();
}

nvmlReturn_t nvmlShutdown(void) {
    count("nvmlShutdown");
    if (!initialized) return E_UNINITIALIZED;
    initialized = 0;
    return OK;
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    count("nvmlSystemGetDriverVersion");
    if (!initialized) return E_UNINITIALIZED;
    if (strlen(driver) + 1 > length) return E_INSUFFICIENT_SIZE;
    strcpy(version, driver);
    return OK;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *n) {
    count("nvmlDeviceGetCount_v2");
    if (!initialized) return E_UNINITIALIZED;
    if (count_error) return count_error;
    *n = (unsigned)ndevices;
    return OK;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, struct device **device) {
    count("nvmlDeviceGetHandleByIndex_v2");
    if (!initialized) return E_UNINITIALIZED;
    if (index >= (unsigned)ndevices || device == NULL) return E_INVALID_ARGUMENT;
    if (index == 0 && current + 1 < nframes) current++;
    *device = &devices[index];
    int rc = fails(&devices[index], "nvmlDeviceGetHandleByIndex_v2");
    return rc;
}

static nvmlReturn_t copy_string(const char *s, char *out, unsigned int length) {
    if (strlen(s) + 1 > length) return E_INSUFFICIENT_SIZE;
    strcpy(out, s);
    return OK;
}

nvmlReturn_t nvmlDeviceGetName(struct device *d, char *name, unsigned int length) {
    ENTER(d, "nvmlDeviceGetName");
    return copy_string(d->name, name, length);
}

nvmlReturn_t nvmlDeviceGetUUID(struct device *d, char *uuid, unsigned int length) {
    ENTER(d, "nvmlDeviceGetUUID");
    return copy_string(d->uuid, uuid, length);
}

nvmlReturn_t nvmlDeviceGetIndex(struct device *d, unsigned int *index) {
    ENTER(d, "nvmlDeviceGetIndex");
    *index = d->index;
    return OK;
}

static unsigned long long used_of(const struct device *d) {
    struct state *st = state_of(d);
    if (!st) return 0;
    if (st->has_gpu) return st->used;
    unsigned long long sum = 0;
    for (int i = 0; i < st->nprocs; i++)
        if (st->procs[i].used != NOT_AVAILABLE) sum += st->procs[i].used;
    return sum;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(struct device *d, nvmlMemory_v2_t *m) {
    ENTER(d, "nvmlDeviceGetMemoryInfo_v2");
    unsigned long long used = used_of(d);
    m->total = d->total;
    m->reserved = 0;
    m->used = used;
    m->free = used < d->total ? d->total - used : 0;
    return OK;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(struct device *d, nvmlMemory_t *m) {
    ENTER(d, "nvmlDeviceGetMemoryInfo");
    unsigned long long used = used_of(d);
    m->total = d->total;
    m->used = used;
    m->free = used < d->total ? d->total - used : 0;
    return OK;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(struct device *d, nvmlUtilization_t *u) {
    ENTER(d, "nvmlDeviceGetUtilizationRates");
    struct state *st = state_of(d);
    u->gpu = st ? st->util : 0;
    u->memory = st ? st->mem_util : 0;
    return OK;
}

nvmlReturn_t nvmlDeviceGetTemperature(struct device *d, int sensor, unsigned int *temp) {
    ENTER(d, "nvmlDeviceGetTemperature");
    if (sensor != 0) return E_INVALID_ARGUMENT;
    struct state *st = state_of(d);
    *temp = st && st->has_gpu ? st->temp : 40;
    return OK;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(struct device *d, unsigned int *mw) {
    ENTER(d, "nvmlDeviceGetPowerUsage");
    struct state *st = state_of(d);
    *mw = st && st->has_gpu ? st->power_mw : 50000;
    return OK;
}

static nvmlReturn_t processes(struct device *d, int graphics, unsigned int *n, nvmlProcessInfo_t *out) {
    struct state *st = state_of(d);
    unsigned have = 0;
    for (int i = 0; st && i < st->nprocs; i++)
        if (st->procs[i].graphics == graphics) have++;
    if (out == NULL || *n < have) {
        *n = have;
        return have == 0 ? OK : E_INSUFFICIENT_SIZE;
    }
    unsigned k = 0;
    for (int i = 0; st && i < st->nprocs; i++) {
        if (st->procs[i].graphics != graphics) continue;
        out[k].pid = st->procs[i].pid;
        out[k].usedGpuMemory = st->procs[i].used;
        out[k].gpuInstanceId = 0xFFFFFFFFu;
        out[k].computeInstanceId = 0xFFFFFFFFu;
        k++;
    }
    *n = k;
    return OK;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(struct device *d, unsigned int *n,
                                                     nvmlProcessInfo_t *infos) {
    ENTER(d, "nvmlDeviceGetComputeRunningProcesses_v3");
    return processes(d, 0, n, infos);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(struct device *d, unsigned int *n,
                                                      nvmlProcessInfo_t *infos) {
    ENTER(d, "nvmlDeviceGetGraphicsRunningProcesses_v3");
    return processes(d, 1, n, infos);
}

/* Like the driver: samples newer than `last_seen` (µs), NOT_FOUND when there are none. */
nvmlReturn_t nvmlDeviceGetProcessUtilization(struct device *d, nvmlProcessUtilizationSample_t *out,
                                             unsigned int *n, unsigned long long last_seen) {
    ENTER(d, "nvmlDeviceGetProcessUtilization");
    struct state *st = state_of(d);
    unsigned long long stamp = (unsigned long long)(current + 1) * 1000000ULL;
    unsigned have = 0;
    for (int i = 0; st && i < st->nprocs && stamp > last_seen; i++)
        if (st->procs[i].has_util) have++;
    if (have == 0) return E_NOT_FOUND;
    if (out == NULL || *n < have) {
        *n = have;
        return E_INSUFFICIENT_SIZE;
    }
    unsigned k = 0;
    for (int i = 0; i < st->nprocs; i++) {
        if (!st->procs[i].has_util) continue;
        out[k] = (nvmlProcessUtilizationSample_t){st->procs[i].pid, stamp, st->procs[i].sm,
                                                  st->procs[i].mem, 0, 0};
        k++;
    }
    *n = k;
    return OK;
}
