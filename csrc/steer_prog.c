/* steer_prog: the eBPF program of steer.h, written with the instruction
 * macros below and loaded by the raw bpf() syscall; the classic program.
 *
 * The eBPF program, registers:
 *   r6 ctx (struct sk_reuseport_md *)   r7 the scan's random start
 *   r8 best load so far                 r9 its slot (-1: none yet)
 *   stack: fp-4 the key being looked at, fp-8 the second p2c key
 *
 * Each candidate slot is "evaluated" by the same block (emit_eval): look up
 * its page, load = clamp(chosen - done) + bias, and keep the smaller of
 * load and r8 without branching (a branchy min makes the verifier walk
 * every combination of outcomes: ~80k instructions at 16 slots). Loads are
 * kept below 2^42 so the subtraction r1 - r8 never overflows.
 */
#define _GNU_SOURCE
#include "steer_prog.h"
#include "steer.h"

#include <errno.h>
#include <linux/bpf.h>
#include <linux/filter.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

/* ---- bpf() ----------------------------------------------------------- */

static int sys_bpf(int cmd, union bpf_attr *attr)
{
    long r;
    do
        r = syscall(__NR_bpf, cmd, attr, sizeof(*attr));
    while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : (int)r;
}

static int map_create(uint32_t type, uint32_t key_size, uint32_t value_size,
                      uint32_t max_entries, uint32_t flags)
{
    union bpf_attr a;
    memset(&a, 0, sizeof(a));
    a.map_type = type;
    a.key_size = key_size;
    a.value_size = value_size;
    a.max_entries = max_entries;
    a.map_flags = flags;
    return sys_bpf(BPF_MAP_CREATE, &a); /* map fds are close-on-exec */
}

int fc_steer_sockarray_set(int map_fd, int slot, int sock_fd)
{
    union bpf_attr a;
    uint32_t key = (uint32_t)slot;
    uint64_t value = (uint64_t)sock_fd;
    memset(&a, 0, sizeof(a));
    a.map_fd = (uint32_t)map_fd;
    a.key = (uint64_t)(uintptr_t)&key;
    a.value = (uint64_t)(uintptr_t)&value;
    a.flags = BPF_ANY;
    return sys_bpf(BPF_MAP_UPDATE_ELEM, &a);
}

int fc_steer_sockarray_del(int map_fd, int slot)
{
    union bpf_attr a;
    uint32_t key = (uint32_t)slot;
    memset(&a, 0, sizeof(a));
    a.map_fd = (uint32_t)map_fd;
    a.key = (uint64_t)(uintptr_t)&key;
    return sys_bpf(BPF_MAP_DELETE_ELEM, &a);
}

static int prog_load(const struct bpf_insn *insns, int n, uint32_t log_level, char *log,
                     size_t logsz)
{
    union bpf_attr a;
    memset(&a, 0, sizeof(a));
    a.prog_type = BPF_PROG_TYPE_SK_REUSEPORT;
    a.expected_attach_type = BPF_SK_REUSEPORT_SELECT_OR_MIGRATE;
    a.insns = (uint64_t)(uintptr_t)insns;
    a.insn_cnt = (uint32_t)n;
    a.license = (uint64_t)(uintptr_t)"Dual MIT/GPL";
    if (log_level && log && logsz > 1) {
        a.log_level = log_level;
        a.log_buf = (uint64_t)(uintptr_t)log;
        a.log_size = (uint32_t)(logsz > 0xffffff ? 0xffffff : logsz);
    }
    return sys_bpf(BPF_PROG_LOAD, &a);
}

int fc_steer_load_prog(const void *insns, int n, char *log, size_t logsz)
{
    int r;
    if (log && logsz)
        log[0] = 0;
    if (!insns || n < 1 || n > BPF_MAXINSNS * 256)
        return -EINVAL;
    /* Quietly first: a log level makes the kernel format every state. */
    r = prog_load(insns, n, 0, NULL, 0);
    if (r >= 0 || !log || logsz < 2)
        return r;
    int again = prog_load(insns, n, 1, log, logsz);
    if (again >= 0) { /* refused once, accepted with a log: keep it */
        log[0] = 0;
        return again;
    }
    log[logsz - 1] = 0;
    return again == -ENOSPC ? r : again; /* ENOSPC: the log was cut, not the cause */
}

/* ---- the instruction macros ------------------------------------------ */

/* One instruction: opcode, dst and src registers, offset, immediate. */
#define INSN(c, d, s, o, i) \
    ((struct bpf_insn){.code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i)})
#define MOV64_IMM(d, i) INSN(BPF_ALU64 | BPF_MOV | BPF_K, d, 0, 0, i)      /* d = i */
#define MOV64_REG(d, s) INSN(BPF_ALU64 | BPF_MOV | BPF_X, d, s, 0, 0)      /* d = s */
#define ALU64_IMM(op, d, i) INSN(BPF_ALU64 | (op) | BPF_K, d, 0, 0, i)     /* d op= i */
#define ALU64_REG(op, d, s) INSN(BPF_ALU64 | (op) | BPF_X, d, s, 0, 0)     /* d op= s */
#define ALU32_IMM(op, d, i) INSN(BPF_ALU | (op) | BPF_K, d, 0, 0, i)       /* (u32) d op= i */
#define LDX(sz, d, s, o) INSN(BPF_LDX | BPF_MEM | (sz), d, s, o, 0)        /* d = *(s + o) */
#define STX(sz, d, s, o) INSN(BPF_STX | BPF_MEM | (sz), d, s, o, 0)        /* *(d + o) = s */
#define ATOMIC_ADD64(d, s, o) INSN(BPF_STX | BPF_ATOMIC | BPF_DW, d, s, o, BPF_ADD)
#define CALL(fn) INSN(BPF_JMP | BPF_CALL, 0, 0, 0, fn)
#define EXIT() INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0)
/* ld_imm64 is two instructions; src BPF_PSEUDO_MAP_FD makes imm a map fd. */
#define LD_IMM64_LO(d, s, v) INSN(BPF_LD | BPF_DW | BPF_IMM, d, s, 0, (int32_t)(uint32_t)(v))
#define LD_IMM64_HI(v) INSN(0, 0, 0, 0, (int32_t)(uint32_t)((uint64_t)(v) >> 32))

enum { R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 };

#define MAX_INSNS 2048
#define MAX_LABELS 128

/* A tiny assembler: forward jumps to labels, patched at the end. */
typedef struct prog_asm {
    struct bpf_insn insn[MAX_INSNS];
    int n;
    int overflow;
    int label_at[MAX_LABELS];
    int nlabels;
    int fix_at[MAX_LABELS * 4], fix_label[MAX_LABELS * 4];
    int nfix;
} prog_asm;

static void emit(prog_asm *a, struct bpf_insn i)
{
    if (a->n < MAX_INSNS)
        a->insn[a->n++] = i;
    else
        a->overflow = 1;
}

static void emit_ld_imm64(prog_asm *a, int reg, uint64_t v)
{
    emit(a, LD_IMM64_LO(reg, 0, v));
    emit(a, LD_IMM64_HI(v));
}

static void emit_ld_map(prog_asm *a, int reg, int map_fd)
{
    emit(a, LD_IMM64_LO(reg, BPF_PSEUDO_MAP_FD, map_fd));
    emit(a, LD_IMM64_HI(0));
}

static int new_label(prog_asm *a)
{
    if (a->nlabels == MAX_LABELS) {
        a->overflow = 1;
        return 0;
    }
    a->label_at[a->nlabels] = -1;
    return a->nlabels++;
}

static void place(prog_asm *a, int label) { a->label_at[label] = a->n; }

/* if (reg op imm) goto label;  src_reg >= 0: compare with a register instead. */
static void jump(prog_asm *a, int op, int reg, int imm, int src_reg, int label)
{
    if (a->nfix == MAX_LABELS * 4) {
        a->overflow = 1;
        return;
    }
    a->fix_at[a->nfix] = a->n;
    a->fix_label[a->nfix++] = label;
    if (src_reg >= 0)
        emit(a, INSN(BPF_JMP | op | BPF_X, reg, src_reg, 0, 0));
    else
        emit(a, INSN(BPF_JMP | op | BPF_K, reg, 0, 0, imm));
}

static int resolve(prog_asm *a)
{
    if (a->overflow)
        return -E2BIG;
    for (int k = 0; k < a->nfix; k++) {
        int to = a->label_at[a->fix_label[k]];
        if (to < 0)
            return -EINVAL;
        a->insn[a->fix_at[k]].off = (int16_t)(to - a->fix_at[k] - 1);
    }
    return 0;
}

/* ---- the eBPF program ------------------------------------------------ */

/* Evaluates the slot whose key is at fp+key_off: r8/r9 keep the least
 * loaded. Clobbers r0-r5. */
static void emit_eval(prog_asm *a, int pages_fd, int key_off)
{
    int skip = new_label(a);
    emit_ld_map(a, R1, pages_fd);
    emit(a, MOV64_REG(R2, R10));
    emit(a, ALU64_IMM(BPF_ADD, R2, key_off));
    emit(a, CALL(BPF_FUNC_map_lookup_elem));
    jump(a, BPF_JEQ, R0, 0, -1, skip);
    emit(a, LDX(BPF_DW, R1, R0, offsetof(fc_steer_page, chosen)));
    emit(a, LDX(BPF_DW, R2, R0, offsetof(fc_steer_page, done)));
    emit(a, ALU64_REG(BPF_SUB, R1, R2));      /* open = chosen - done */
    emit(a, MOV64_REG(R2, R1));               /* clamp a "negative" open to 0 */
    emit(a, ALU64_IMM(BPF_ARSH, R2, 63));
    emit(a, ALU64_IMM(BPF_XOR, R2, -1));
    emit(a, ALU64_REG(BPF_AND, R1, R2));
    emit(a, ALU64_IMM(BPF_LSH, R1, 24));      /* below 2^40 */
    emit(a, ALU64_IMM(BPF_RSH, R1, 24));
    emit(a, LDX(BPF_DW, R2, R0, offsetof(fc_steer_page, bias)));
    emit(a, ALU64_IMM(BPF_LSH, R2, 23));      /* below 2^41 */
    emit(a, ALU64_IMM(BPF_RSH, R2, 23));
    emit(a, ALU64_REG(BPF_ADD, R1, R2));      /* load, below 2^42 */
    emit(a, MOV64_REG(R2, R1));               /* m = load < best ? ~0 : 0 */
    emit(a, ALU64_REG(BPF_SUB, R2, R8));
    emit(a, ALU64_IMM(BPF_ARSH, R2, 63));
    emit(a, MOV64_REG(R3, R1));               /* best += (load - best) & m */
    emit(a, ALU64_REG(BPF_SUB, R3, R8));
    emit(a, ALU64_REG(BPF_AND, R3, R2));
    emit(a, ALU64_REG(BPF_ADD, R8, R3));
    emit(a, LDX(BPF_W, R4, R10, key_off));    /* slot ^= (key ^ slot) & m */
    emit(a, ALU64_REG(BPF_XOR, R4, R9));
    emit(a, ALU64_REG(BPF_AND, R4, R2));
    emit(a, ALU64_REG(BPF_XOR, R9, R4));
    place(a, skip);
}

/* Every slot, from a random start r7 (so ties spread): key = (r7 + k) mod n
 * computed without a branch or a division. */
static void emit_scan(prog_asm *a, int nslots, int pages_fd)
{
    if (nslots > 1) {
        emit(a, CALL(BPF_FUNC_get_prandom_u32));
        emit(a, ALU32_IMM(BPF_MOD, R0, nslots));
        emit(a, MOV64_REG(R7, R0));
    } else {
        emit(a, MOV64_IMM(R7, 0));
    }
    for (int k = 0; k < nslots; k++) {
        emit(a, MOV64_REG(R3, R7));
        emit(a, ALU64_IMM(BPF_ADD, R3, k - nslots));  /* r3 = r7 + k - n */
        emit(a, MOV64_REG(R4, R3));
        emit(a, ALU64_IMM(BPF_ARSH, R4, 63));
        emit(a, ALU64_IMM(BPF_AND, R4, nslots));
        emit(a, ALU64_REG(BPF_ADD, R3, R4));         /* + n if it went below 0 */
        emit(a, STX(BPF_W, R10, R3, -4));
        emit_eval(a, pages_fd, -4);
    }
}

/* Power of two choices: two distinct random slots, up to three draws while
 * the best found is biased out (a dead or draining slot). The bound checks
 * after each modulo are for the verifier (and say what the index is). */
static void emit_p2c(prog_asm *a, int nslots, int pages_fd, int done, int pass)
{
    for (int draw = 0; draw < 3; draw++) {
        emit(a, CALL(BPF_FUNC_get_prandom_u32));
        emit(a, ALU32_IMM(BPF_MOD, R0, nslots));
        jump(a, BPF_JGE, R0, nslots, -1, pass);
        emit(a, STX(BPF_W, R10, R0, -4));
        emit(a, CALL(BPF_FUNC_get_prandom_u32));
        emit(a, ALU32_IMM(BPF_MOD, R0, nslots - 1));  /* b in [0, n-1) */
        emit(a, LDX(BPF_W, R1, R10, -4));
        emit(a, MOV64_REG(R2, R1));                   /* b += (b >= a): distinct */
        emit(a, ALU64_REG(BPF_SUB, R2, R0));
        emit(a, ALU64_IMM(BPF_SUB, R2, 1));
        emit(a, ALU64_IMM(BPF_RSH, R2, 63));
        emit(a, ALU64_REG(BPF_ADD, R0, R2));
        jump(a, BPF_JGE, R0, nslots, -1, pass);
        emit(a, STX(BPF_W, R10, R0, -8));
        emit_eval(a, pages_fd, -4);
        emit_eval(a, pages_fd, -8);
        if (draw < 2) {
            emit_ld_imm64(a, R1, FC_STEER_BIAS_OUT);
            jump(a, BPF_JLT, R8, 0, R1, done);
        }
    }
}

static int build(prog_asm *a, int nslots, int pages_fd, int sockarray_fd)
{
    int chosen = new_label(a), pass = new_label(a);

    emit(a, MOV64_REG(R6, R1));
    emit_ld_imm64(a, R8, UINT64_C(1) << 62);
    emit(a, MOV64_IMM(R9, -1));
    if (nslots <= FC_STEER_UNROLL)
        emit_scan(a, nslots, pages_fd);
    else
        emit_p2c(a, nslots, pages_fd, chosen, pass);
    place(a, chosen);
    jump(a, BPF_JSLT, R9, 0, -1, pass);
    emit(a, STX(BPF_W, R10, R9, -4));
    /* Migration (ctx->migrating_sk set) takes the same path: the closing
     * slot was biased out, and a failed select falls back to the kernel's
     * hash over the live sockets. */
    emit(a, MOV64_REG(R1, R6));
    emit_ld_map(a, R2, sockarray_fd);
    emit(a, MOV64_REG(R3, R10));
    emit(a, ALU64_IMM(BPF_ADD, R3, -4));
    emit(a, MOV64_IMM(R4, 0));
    emit(a, CALL(BPF_FUNC_sk_select_reuseport));
    jump(a, BPF_JNE, R0, 0, -1, pass);               /* no socket there: hash */
    emit_ld_map(a, R1, pages_fd);
    emit(a, MOV64_REG(R2, R10));
    emit(a, ALU64_IMM(BPF_ADD, R2, -4));
    emit(a, CALL(BPF_FUNC_map_lookup_elem));
    jump(a, BPF_JEQ, R0, 0, -1, pass);
    emit(a, MOV64_IMM(R1, 1));
    emit(a, ATOMIC_ADD64(R0, R1, offsetof(fc_steer_page, chosen)));
    place(a, pass);
    emit(a, MOV64_IMM(R0, SK_PASS));
    emit(a, EXIT());
    return resolve(a);
}

int fc_steer_prog_load(int span, int pages_fd, int sockarray_fd, const char **call,
                       char *log, size_t logsz)
{
    prog_asm *a;
    int r;

    *call = "steer: assembling the program";
    if (span < 1 || span > FC_STEER_MAX_SLOTS)
        return -EINVAL;
    a = calloc(1, sizeof(*a));
    if (!a)
        return -ENOMEM;
    r = build(a, span, pages_fd, sockarray_fd);
    if (r == 0) {
        *call = "bpf(BPF_PROG_LOAD)";
        r = fc_steer_load_prog(a->insn, a->n, log, logsz);
    }
    free(a);
    return r;
}

/* The maps, and a first program over slot 0 (so a refusal shows at once);
 * fc_steer_add_socket widens it to the slots in use. */
int fc_steer_prog_ebpf(int nslots, size_t page, int *pages_fd, int *sockarray_fd,
                       int *prog_fd, const char **call, char *log, size_t logsz)
{
    int r;

    int own_pages = *pages_fd < 0;

    *sockarray_fd = *prog_fd = -1;
    if (own_pages) {
        *call = "bpf(BPF_MAP_CREATE, ARRAY)";
        r = map_create(BPF_MAP_TYPE_ARRAY, 4, (uint32_t)page, (uint32_t)nslots, BPF_F_MMAPABLE);
        if (r < 0)
            return r;
        *pages_fd = r;
    }
    *call = "bpf(BPF_MAP_CREATE, REUSEPORT_SOCKARRAY)";
    r = map_create(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, (uint32_t)nslots, 0);
    if (r < 0)
        goto fail;
    *sockarray_fd = r;
    r = fc_steer_prog_load(1, *pages_fd, *sockarray_fd, call, log, logsz);
    if (r < 0)
        goto fail;
    *prog_fd = r;
    return 0;
fail:
    if (own_pages && *pages_fd >= 0) {
        close(*pages_fd);
        *pages_fd = -1;
    }
    if (*sockarray_fd >= 0)
        close(*sockarray_fd);
    *sockarray_fd = -1;
    return r;
}

/* ---- the classic program --------------------------------------------- */

int fc_steer_cbpf_attach(int sock_fd, const int *order, int norder, const uint32_t *w)
{
    struct sock_filter *f;
    struct sock_fprog prog;
    uint32_t total = 0;
    int n = 0, r = 0;

    if (norder < 1 || 2 + 2 * norder > BPF_MAXINSNS)
        return -EINVAL;
    for (int k = 0; k < norder; k++)
        total += w[order[k]];
    if (total == 0)
        return -EINVAL;
    f = calloc((size_t)(2 + 2 * norder), sizeof(*f));
    if (!f)
        return -ENOMEM;
    f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_RANDOM);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_ALU | BPF_MOD | BPF_K, total);
    /* A = rand % total; for each index k: if A < cum_k return k. */
    uint32_t cum = 0;
    for (int k = 0; k < norder; k++) {
        cum += w[order[k]];
        if (w[order[k]] == 0)
            continue;
        if (cum == total) { /* the last one with weight: no test needed */
            f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, (uint32_t)k);
            break;
        }
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, cum, 1, 0);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, (uint32_t)k);
    }
    memset(&prog, 0, sizeof(prog)); /* the padding after len goes to the kernel too */
    prog.len = (unsigned short)n;
    prog.filter = f;
    if (setsockopt(sock_fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog, sizeof(prog)) < 0)
        r = -errno;
    free(f);
    return r;
}
