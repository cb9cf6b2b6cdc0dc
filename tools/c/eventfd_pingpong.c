/* Baseline for tools/bench_ring.py: eventfd ping-pong between two processes.
 *
 * Two eventfds; the parent writes "ping" into one and blocks reading the
 * other, the child echoes. Prints the one-way latency in microseconds
 * (round-trip time / 2) as a single number.
 *
 * Build: gcc -O2 -o eventfd_pingpong eventfd_pingpong.c
 * Usage: eventfd_pingpong [iterations]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void must(int ok, const char *what)
{
    if (!ok) {
        perror(what);
        exit(1);
    }
}

int main(int argc, char **argv)
{
    long iterations = argc > 1 ? atol(argv[1]) : 100000;
    int to_child = eventfd(0, 0), to_parent = eventfd(0, 0);
    uint64_t one = 1, value;
    struct timespec start, end;
    pid_t pid;

    must(to_child >= 0 && to_parent >= 0, "eventfd");
    pid = fork();
    must(pid >= 0, "fork");
    if (pid == 0) {
        for (long i = 0; i < iterations; i++) {
            must(read(to_child, &value, 8) == 8, "child read");
            must(write(to_parent, &one, 8) == 8, "child write");
        }
        _exit(0);
    }
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long i = 0; i < iterations; i++) {
        must(write(to_child, &one, 8) == 8, "parent write");
        must(read(to_parent, &value, 8) == 8, "parent read");
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    waitpid(pid, NULL, 0);
    double elapsed_us = (end.tv_sec - start.tv_sec) * 1e6 + (end.tv_nsec - start.tv_nsec) / 1e3;
    printf("%.3f\n", elapsed_us / iterations / 2);
    return 0;
}
